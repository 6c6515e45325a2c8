"""Where the Engine's time goes: torch.profiler over its guided stylization, run eagerly
(the CUDA graphs replay the same kernels) in the bench profile of this machine (512² fp16
on a GPU, the reduced 64² fp32 model on a CPU), the ops sorted by their own device time.
bench/gpu_check.sh runs it first, right after the install: it is what bench/cost_model.py is
calibrated against. With -o profile.txt it also writes profile.json: per batch size, the
kernels (device time, calls, share of the total), the launch count and the wall time.

    python bench/profile_engine.py [--batch 32] [-o profile.txt]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import DEVICE, ON_GPU, PROFILE
from mmfs_fast import benchmark as mb
from mmfs_fast.engine import Engine

PRECISION = "fp16" if ON_GPU else "fp32"


def profile_guided_stylization(batch: int, rounds: int = 3) -> tuple[str, dict]:
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
        start = time.perf_counter()
        for _ in range(rounds):
            engine.stylize(faces, w_plus)
        if ON_GPU:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / rounds
    sort_by = "self_device_time_total" if ON_GPU else "self_cpu_time_total"
    header = (f"Engine guided stylization, {PROFILE.name}, {PRECISION}, batch {batch}, eager, {rounds} calls; "
              f"{mb.environment()['device']}, commit {mb.environment()['git_commit']}")
    return header + "\n" + prof.key_averages().table(sort_by=sort_by, row_limit=30), _summary(prof, rounds, wall)


def _summary(prof, rounds: int, wall_s: float) -> dict:
    """Per call: the device kernels (CPU ops on a CPU) by their own time, with their share."""
    attr = "self_device_time_total" if ON_GPU else "self_cpu_time_total"
    kernels = [e for e in prof.key_averages() if getattr(e, attr) > 0
               and (not ON_GPU or e.device_type == torch.autograd.DeviceType.CUDA)]
    total = sum(getattr(e, attr) for e in kernels)
    rows = sorted(({"name": e.key, "us_per_call": getattr(e, attr) / rounds, "calls_per_call": e.count / rounds,
                    "share": getattr(e, attr) / total if total else 0.0} for e in kernels),
                  key=lambda r: -r["us_per_call"])
    return {"device_time_us_per_call": total / rounds, "launches_per_call": sum(r["calls_per_call"] for r in rows),
            "wall_ms_per_call_eager": wall_s * 1e3, "kernels": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[PROFILE.batches[0], PROFILE.batches[-1]])
    p.add_argument("-o", "--out", help="write the tables here as well as to stdout")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch):
        p.error("--batch takes positive sizes")
    tables, summaries = [], {}
    for batch in args.batch:
        table, summaries[batch] = profile_guided_stylization(batch)
        tables.append(table)
        print(table, flush=True)
        if args.out:  # after each batch size, so a run cut short keeps what it has
            Path(args.out).write_text("\n\n".join(tables) + "\n")
            env = mb.environment()
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                {"workload": "guided_stylization", "profile": PROFILE.name, "precision": PRECISION,
                 "device": env["device"], "commit": env["git_commit"], "by_batch": summaries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
