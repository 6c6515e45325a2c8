"""End-to-end benchmarks of the paper's timing table (SPEC §7) and of fine-tuning.

Configurations: ``eager-fp32-ref`` (plain Stylizer + CLIP in fp32 on the pure-PyTorch
ops: the stand-in for the official code), ``compile-fp32-ref`` (torch.compile of it)
and ``mmfs-fast`` (the Engine: fp16 and CUDA graphs on a GPU; fp32 eager on the CPU).
Speed-ups in bench/summarize.py are taken against the first two.
"""
from __future__ import annotations

import functools

import pytest
import torch

from harness import DEVICE, ON_GPU, PROFILE
from mmfs_fast import benchmark as mb

BASELINE, COMPILED, FASTEST = "eager-fp32-ref", "compile-fp32-ref", "mmfs-fast"
PRECISION = "fp16" if ON_GPU else "fp32"  # the Engine offers fp16 on CUDA only
# fine-tuning through the modulated_conv2d op (per-sample weights) instead of the unfused
# shared-weight convolution: the measurement behind fast fine-tuning's fused_modconv=False
FUSED = (f"{FASTEST}-fused",) if ON_GPU else ()
# candidate defaults not yet measured: NHWC activations; torch.compile(max-autotune) instead of
# hand-captured graphs (the Engine's compile=True)
NCHW, ENGINE_COMPILED = f"{FASTEST}-nchw", f"{FASTEST}-compiled"
HEURISTIC_CUDNN = f"{FASTEST}-heuristic-cudnn"  # cudnn_benchmark=False: what autotuning the convolutions buys
FINETUNE_STEPS = 10 if ON_GPU else 2
FINETUNE_BATCH = 8 if ON_GPU else 2  # the paper's batch on a GPU


@functools.cache
def pipeline(config: str) -> mb.Workloads:
    if config.startswith(FASTEST):
        stylizer, clip = mb.build_models(PROFILE, DEVICE, clip_dtype=mb.DTYPES[PRECISION])
        return mb.fastest_pipeline(stylizer, clip, PRECISION,
                                   channels_last=False if config == NCHW else None, compile=config == ENGINE_COMPILED,
                                   cudnn_benchmark=config != HEURISTIC_CUDNN)
    stylizer, clip = mb.build_models(PROFILE, DEVICE, impl="ref")
    return mb.ModelPipeline(stylizer, clip, compile=config == COMPILED)


def _cases(configs) -> list:
    return [(config, scenario, batch) for config in configs for scenario in mb.SCENARIOS for batch in PROFILE.batches]


def _measure_e2e(config: str, scenario: str, batch: int, measure, benchmark) -> None:
    precision = PRECISION if config.startswith(FASTEST) else "fp32"
    seconds = measure(pipeline(config).workload(scenario, batch), group=f"e2e {scenario} b{batch}",
                      scenario=scenario, config=config, batch=batch, precision=precision)
    benchmark.extra_info["images_per_s"] = batch / seconds


@pytest.mark.parametrize("config,scenario,batch", _cases((BASELINE, FASTEST)) + [
    (config, "guided_stylization", batch) for config in (NCHW, HEURISTIC_CUDNN)
    for batch in PROFILE.batches])
def test_e2e(config: str, scenario: str, batch: int, measure, benchmark):
    _measure_e2e(config, scenario, batch, measure, benchmark)


@pytest.mark.parametrize("config", [BASELINE, FASTEST, *FUSED])
def test_finetune(config: str, measure, benchmark):
    """FINETUNE_STEPS steps of text-prompt fine-tuning (setup included, so the per-step
    time is an upper bound); extra_info has the projected 200-step time."""
    from mmfs_fast.finetune import finetune

    fast = config != BASELINE
    stylizer, clip = mb.build_models(PROFILE, DEVICE, impl="auto" if fast else "ref")
    dino = mb.build_dino(PROFILE, DEVICE)
    size = PROFILE.stylizer.size
    faces = torch.rand(FINETUNE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2 - 1

    def run():
        finetune(stylizer, clip, dino, faces, text="a pop art portrait", steps=FINETUNE_STEPS, decay_steps=0,
                 batch_size=FINETUNE_BATCH, progress=False, fast=fast, fused_modconv=not fast or config in FUSED)

    seconds = measure(run, group="finetune", rounds=2 if ON_GPU else 1, scenario="finetune", config=config,
                      batch=FINETUNE_BATCH, steps=FINETUNE_STEPS, precision="bf16-autocast" if fast and ON_GPU else "fp32")
    benchmark.extra_info.update(seconds_per_step=seconds / FINETUNE_STEPS,
                                projected_200_steps_s=200 * seconds / FINETUNE_STEPS)


# last, after fine-tuning: compiling costs tens of seconds per case, so a time-boxed run
# (bench/gpu_check.sh) cuts here first; on a CPU (minutes per compile) one case keeps the path alive
@pytest.mark.parametrize("config,scenario,batch", [
    c for c in _cases((COMPILED,)) if ON_GPU or c[1:] == ("guided_stylization", 1)] + [
    (ENGINE_COMPILED, scenario, batch) for scenario, batch in (("text_to_wplus", 1), ("image_to_wplus", 1),
                                                                ("guided_stylization", 1), ("guided_stylization", 32))
    if ON_GPU])
def test_e2e_compiled(config: str, scenario: str, batch: int, measure, benchmark):
    _measure_e2e(config, scenario, batch, measure, benchmark)
