"""Training (issue 9): seconds per iteration of each stage (SPEC §6), one train_step +
EMA update on random batches already on the device (data loading, logging and
checkpoints are not timed).

On a GPU the paper's setting: 512², ngf 64, batch 8, bf16 autocast, random-initialised
teacher, DINO ViT-B/8 and CLIP ViT-B/32 (paper: ≈ 1.8 s/iter on a V100). On the CPU a
tiny config (128², ngf 4, batch 2, the reduced profile's small DINO and CLIP). Stage II's
lazy R1 (every ``r1_every`` steps) is its own case, "2+r1"; bench/summarize.py
amortises it.

Fine-tuning (stage IV): one step of a run already set up (the prompt encoded, the faces'
constants computed), one-shot and zero-shot, the fast path against the eager fp32 official
architecture (``fast=False``: per-sample modulated convolution, the faces re-encoded every
step), in the same run. On a GPU the paper's batch 8 at 512² (the fast path in bf16 and one
CUDA graph); on the CPU the reduced profile at batch 2.
"""
from __future__ import annotations

import pytest
import torch

from harness import DEVICE, ON_GPU, PROFILE
from mmfs_fast import benchmark as mb
from mmfs_fast import finetune as ft
from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.distributed import World
from mmfs_fast.train.trainer import build_stage

pytest.importorskip("timm", reason="Stage II's DINO needs timm")
pytest.importorskip("open_clip", reason="Stage III's CLIP needs open_clip_torch")

# the default TrainConfig is the paper's model; 128² is the least the discriminator's feature mode takes
MODEL = {} if ON_GPU else dict(size=128, ngf=4, n_mlp=2, d_base=8)
BATCH = 8 if ON_GPU else 2
ROUNDS = 3 if ON_GPU else 2
CASES = {"1": (1, False), "2": (2, False), "2+r1": (2, True), "3": (3, False)}  # case → (stage, with R1)


def encoders() -> dict:
    """Ready-made frozen DINO and CLIP on the CPU; on a GPU the stages build the full ones."""
    if ON_GPU:
        return {}
    return {"dino": mb.build_dino(PROFILE, DEVICE), "clip": mb.build_models(PROFILE, DEVICE)[1]}


@pytest.mark.parametrize("case", CASES)
def test_train_iteration(case: str, tmp_path, measure, benchmark):
    stage_number, with_r1 = CASES[case]
    # the image folders are never read: batches come from here
    cfg = TrainConfig(stage=stage_number, random_init=True, batch_size=BATCH, face_dir=str(tmp_path),
                      art_dir=str(tmp_path), out_dir=str(tmp_path), device=str(DEVICE), **MODEL)
    stage = build_stage(cfg, World(device=DEVICE), encoders())
    generator = torch.Generator().manual_seed(0)
    batch = {field: (torch.rand(BATCH, 3, cfg.size, cfg.size, generator=generator) * 2 - 1).to(DEVICE)
             for field in stage.datasets}
    step = 0 if with_r1 else 1  # lazy R1 runs when step % r1_every == 0

    def iteration():
        stage.train_step(batch, step)
        stage.update_ema()

    seconds = measure(iteration, group="train", rounds=ROUNDS, task="train", stage=stage_number, case=case,
                      r1=with_r1, r1_every=cfg.r1_every, size=cfg.size, ngf=cfg.ngf, batch=BATCH,
                      precision="bf16-autocast" if cfg.amp and ON_GPU else "fp32")
    benchmark.extra_info.update(seconds_per_iter=seconds, iters_per_s=1 / seconds)


FINETUNE_BATCH = 8 if ON_GPU else 2
FINETUNE_PATHS = {"mmfs-fast": True, "eager-fp32-official": False}
PROMPTS = {"zero-shot": {"text": "a pop art portrait"}, "one-shot": {"ref_image": "reference"}}


@pytest.mark.parametrize("path", FINETUNE_PATHS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_finetune_step(prompt: str, path: str, measure, benchmark):
    fast = FINETUNE_PATHS[path]
    stylizer, clip = mb.build_models(PROFILE, DEVICE, impl="auto" if fast else "ref")
    dino = mb.build_dino(PROFILE, DEVICE)
    size = PROFILE.stylizer.size
    images = torch.rand(FINETUNE_BATCH + 1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    faces, reference = images[1:].to(DEVICE), images[:1].to(DEVICE)
    kind = {k: reference if v == "reference" else v for k, v in PROMPTS[prompt].items()}
    # steps: the lr stays at its full value however many steps the timer runs
    settings = ft.FinetuneSettings(steps=10 ** 9, batch_size=FINETUNE_BATCH, fast=fast)
    torch.manual_seed(0)
    run = ft.FinetuneRun(stylizer, clip, dino, faces, ft.encode_prompt(clip, **kind), settings)
    for _ in range(ft.CAPTURE_AFTER + 1):  # Adam's state, warm-up and (on a GPU) the graph capture
        run.step()
    seconds = measure(run.step, group=f"finetune {prompt}", rounds=ROUNDS, task="finetune", prompt=prompt,
                      config=path, size=size, ngf=PROFILE.stylizer.ngf, batch=FINETUNE_BATCH,
                      precision="bf16-autocast" if run.settings.mixed_precision else "fp32",
                      captured=run.graph is not None)
    benchmark.extra_info.update(seconds_per_step=seconds, steps_per_s=1 / seconds,
                                projected_209_steps_s=209 * seconds)
