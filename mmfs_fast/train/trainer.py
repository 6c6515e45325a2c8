"""The training loop shared by the stages: seeding, data, resume, EMA, logging and
checkpoints (rank 0 writes; every rank computes)."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from mmfs_fast.atomic import make_dirs, remove_stale_temps, save_torch
from mmfs_fast.models.checkpoint import CheckpointError, load_state
from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.data import ImageFolder, batches
from mmfs_fast.train.distributed import World, barrier, broadcast_state, gather_objects, init_world, shutdown
from mmfs_fast.train.monitor import Monitor
from mmfs_fast.train.stages import N_SAMPLES, STAGES, Stage
from mmfs_fast.train.state import LATEST, RESUME_KEYS, read_stage_checkpoint, rng_state, set_rng_state

EXPORT = "stylizer.safetensors"


def train(cfg: TrainConfig, encoders: dict | None = None) -> Path:
    """Run (or resume) one stage; returns the path of its latest checkpoint.

    ``encoders`` may hold ready-made frozen encoders ("dino" with ``self_similarity``,
    "clip" with ``encode_image``) instead of the ones built from the weight files.
    Launched by ``torchrun``, every process calls this and the ranks train data-parallel.
    """
    world = init_world(cfg.device)
    try:
        return _train(cfg, world, encoders or {})
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, world: World, encoders: dict) -> Path:
    out_dir = Path(cfg.out_dir)
    latest = out_dir / LATEST
    if latest.exists() and not cfg.resume:
        raise FileExistsError(f"{latest} exists: pass resume=True (--resume) to continue it, or choose another out_dir")
    if world.is_main:
        remove_stale_temps(make_dirs(out_dir))
    stage = build_stage(cfg, world, encoders)
    torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
    start = _resume(stage, latest, world) if latest.exists() else 0

    folders = [ImageFolder(getattr(cfg, field), cfg.size, cfg.min_image_size) for field in stage.datasets]
    streams = {field: batches(folder, cfg.batch_size, cfg.seed + i, world.rank, world.size, start, cfg.workers,
                              world.device)
               for i, (field, folder) in enumerate(zip(stage.datasets, folders))}
    sample_faces = (torch.stack([folders[0][i] for i in range(min(N_SAMPLES, len(folders[0])))]).to(world.device)
                    if folders else None)

    monitor = Monitor(out_dir, start, cfg.total_steps, enabled=world.is_main)
    try:
        for step in range(start, cfg.total_steps):
            losses = stage.train_step({field: next(stream) for field, stream in streams.items()}, step)
            stage.update_ema()
            done = step + 1
            monitor.log(done, losses)
            if world.is_main and (done % cfg.sample_every == 0 or done == cfg.total_steps):
                monitor.save_samples(done, stage.sample_rows(sample_faces))
            if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
                _save(stage, latest, done, world)
        if world.is_main:
            stage.G_ema.save(out_dir / EXPORT)
    finally:
        monitor.close()
    return latest


def build_stage(cfg: TrainConfig, world: World = World(), encoders: dict | None = None) -> Stage:
    """The stage's models and optimisers as training starts, identical on every rank."""
    torch.manual_seed(cfg.seed)
    stage = STAGES[cfg.stage](cfg, world, encoders or {})
    broadcast_state(world, stage.G, stage.G_ema, stage.D)
    return stage


def _save(stage: Stage, path: Path, step: int, world: World) -> None:
    rng = gather_objects(world, rng_state())
    if world.is_main:
        cpu = lambda module: {k: v.detach().cpu() for k, v in module.state_dict().items()}  # noqa: E731
        save_torch({
            "G_ema_model": stage.G_ema.official_state_dict(),
            "D_model": cpu(stage.D),
            "G_model": cpu(stage.G),
            "optimizers": {name: opt.state_dict() for name, opt in stage.optimizers.items()},
            "step": step,
            "stage": stage.cfg.stage,
            "rng": rng,
            "config": dataclasses.asdict(stage.cfg),
        }, path)
    barrier(world)


def _resume(stage: Stage, path: Path, world: World) -> int:
    contents = read_stage_checkpoint(path, RESUME_KEYS)
    if contents["stage"] != stage.cfg.stage:
        raise CheckpointError(f"{path} is a stage {contents['stage']} checkpoint, not stage {stage.cfg.stage}")
    for module, key in ((stage.G, "G_model"), (stage.G_ema, "G_ema_model"), (stage.D, "D_model")):
        load_state(module, contents[key], name=f"{path} ({key})")
    for name, optimizer in stage.optimizers.items():
        optimizer.load_state_dict(contents["optimizers"][name])
    rng = contents["rng"]
    if len(rng) == world.size:
        set_rng_state(rng[world.rank])
    else:
        warnings.warn(f"{path} was written by {len(rng)} processes, this run has {world.size}: the random "
                      "streams restart, so the run continues but not bit-identically", stacklevel=2)
    return int(contents["step"])
