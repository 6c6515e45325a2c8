"""Where the Engine's time goes: torch.profiler over its guided stylization, run eagerly
(the CUDA graphs replay the same kernels) in the bench profile of this machine (512² fp16
on a GPU, the reduced 64² fp32 model on a CPU), the ops sorted by their own device time.
bench/gpu_check.sh runs it after the end-to-end benchmarks.

    python bench/profile_engine.py [--batch 32] [--rows 30] [-o profile.txt]
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from harness import DEVICE, ON_GPU, PROFILE
from mmfs_fast import benchmark as mb
from mmfs_fast.engine import Engine

PRECISION = "fp16" if ON_GPU else "fp32"


def profile_guided_stylization(batch: int, rounds: int = 3) -> str:
    stylizer, _ = mb.build_models(PROFILE, DEVICE)
    engine = Engine(stylizer, precision=PRECISION, device=DEVICE, cuda_graphs=False, buckets=None)
    size, dim = PROFILE.stylizer.size, PROFILE.stylizer.style_dim
    g = torch.Generator().manual_seed(0)
    faces = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(DEVICE)
    w_plus = torch.randn(batch, 10, dim, generator=g).to(DEVICE)
    for _ in range(2):  # cuDNN autotuning, Triton JIT
        engine.stylize(faces, w_plus)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            engine.stylize(faces, w_plus)
        if ON_GPU:
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if ON_GPU else "self_cpu_time_total"
    header = (f"Engine guided stylization, {PROFILE.name}, {PRECISION}, batch {batch}, eager, {rounds} calls; "
              f"{mb.environment()['device']}, commit {mb.environment()['git_commit']}")
    return header + "\n" + prof.key_averages().table(sort_by=sort_by, row_limit=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[PROFILE.batches[0], PROFILE.batches[-1]])
    p.add_argument("-o", "--out", help="write the tables here as well as to stdout")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch):
        p.error("--batch takes positive sizes")
    text = "\n\n".join(profile_guided_stylization(batch) for batch in args.batch)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
