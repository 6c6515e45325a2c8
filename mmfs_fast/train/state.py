"""Training checkpoints: the official layout (``G_ema_model``, ``D_model``) plus what an
exact resume needs, written atomically so that a crash mid-save keeps the previous file."""
from __future__ import annotations

import torch

from mmfs_fast.models.checkpoint import CheckpointError, read_checkpoint

LATEST = "latest.pt"
RESUME_KEYS = ("G_ema_model", "D_model", "G_model", "optimizers", "step", "stage", "rng")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_stage_checkpoint(path, keys=("G_ema_model", "D_model")) -> dict:
    """A training checkpoint with at least ``keys``; CheckpointError for anything else
    (truncated, foreign, or from a different tool)."""
    contents, metadata = read_checkpoint(path)
    if metadata is not None:
        raise CheckpointError(f"{path}: a safetensors export holds only the generator; training needs the "
                              f"{LATEST} checkpoint of the previous stage")
    if missing := [k for k in keys if k not in contents]:
        raise CheckpointError(f"{path}: not an MMFS training checkpoint (missing {', '.join(missing)})")
    return contents
