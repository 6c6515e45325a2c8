"""Local weight files of the metric networks: loading a state dict, naming what is wrong, hashing."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


class MetricWeightsError(ValueError):
    """A metric network's weights file is missing or does not fit the network."""


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path, network: str, how_to_get: str) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt (a state dict, possibly under "state_dict") or .safetensors file."""
    if path is None:
        raise MetricWeightsError(f"{network} needs a local weights file; nothing is downloaded. {how_to_get}")
    path = Path(path)
    if not path.is_file():
        raise MetricWeightsError(f"{network} weights: no such file {path}. {how_to_get}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors have many types
        raise MetricWeightsError(f"{path}: cannot read {network} weights ({type(e).__name__}: {e}). "
                                 f"{how_to_get}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricWeightsError(f"{path}: not a state dict of {network} weights. {how_to_get}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: torch.nn.Module, state: dict, path, network: str, how_to_get: str,
              ignore: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict`` with a message that names the file and the first mismatches.
    Keys starting with an ``ignore`` prefix (heads the metric does not use) are dropped."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise MetricWeightsError(f"{path}: not {network} weights ({'; '.join(problems)}). {how_to_get}")
    module.load_state_dict(state, strict=False)
