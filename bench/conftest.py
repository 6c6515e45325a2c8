"""Shared machinery of the benchmark suite: device and size profile, and the
``measure`` fixture that times a call with pytest-benchmark's pedantic mode.

On a CUDA machine everything runs at 512² (profile gpu-512); without one the same
suite runs on the CPU at reduced sizes, fp32 only, few rounds (profile
cpu-reduced-64): those numbers only show that the suite works.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import regression
import winners
from harness import DEVICE, MAX_ITERATIONS, ON_GPU, PROFILE, ROUND_SECONDS, ROUNDS
from mmfs_fast import benchmark as mb


def pytest_addoption(parser):
    group = parser.getgroup("mmfs_fast latency gate")
    group.addoption("--baseline", help="baseline dir of pytest-benchmark JSON (default: "
                    "bench/results/baseline/<this device kind>)")
    group.addoption("--median-margin", type=float, default=regression.MEDIAN_MARGIN,
                    help="on a GPU: fail a case whose median is slower than the baseline's by more (default 0.15)")
    group.addoption("--ratio-margin", type=float,
                    help="fail a case whose speed-up over its eager fp32 reference falls below the baseline's by "
                         "more (default 0.25 on a GPU, 0.5 on a CPU)")
    group.addoption("--no-regression-gate", action="store_true",
                    help="do not compare with the baseline (also: MMFS_BENCH_GATE=0)")
    group.addoption("--no-winners", action="store_true",
                    help="on a GPU, do not rewrite mmfs_fast/ops/winners.json from the op benchmarks")


def _current_cases(config) -> list[regression.Case]:
    session = getattr(config, "_benchmarksession", None)
    cases = []
    for bench in getattr(session, "benchmarks", None) or []:
        if bench.stats is not None and getattr(bench.stats, "rounds", 0):
            cases.append(regression.Case(bench.name, bench.stats.median, dict(bench.extra_info)))
    return cases


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    cases = _current_cases(config)
    if not cases:
        return
    env = mb.environment()
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if ON_GPU and not config.getoption("--no-winners"):
        op_cases = [{**c.info, "median_s": c.median_s} for c in cases if "op" in c.info and "shape" in c.info]
        if op_cases:
            path = winners.write(op_cases, env["device"], env["git_commit"])
            reporter and reporter.write_line(f"op winners written to {path} (commit it)")
    if config.getoption("--no-regression-gate") or os.environ.get("MMFS_BENCH_GATE", "1") == "0":
        return
    kind = regression.device_kind(env["device"], env["device_type"])
    baseline_dir = Path(config.getoption("--baseline") or regression.BASELINES / kind)
    files = sorted(baseline_dir.glob("*.json"))
    if not files:
        reporter and reporter.write_line(f"latency gate: no baseline in {baseline_dir}: not checked")
        return
    baseline = regression.load(files)
    base_device = next((c.info.get("device") for c in baseline if c.info.get("device")), None)
    found = regression.regressions(cases, baseline, same_gpu=ON_GPU and base_device == env["device"],
                                   median_margin=config.getoption("--median-margin"),
                                   ratio_margin=config.getoption("--ratio-margin")
                                   or regression.RATIO_MARGIN[env["device_type"]])
    if reporter:
        reporter.write_sep("=", f"latency gate against {baseline_dir}: {len(found)} regressed")
        for line in found:
            reporter.write_line(line)
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_header(config):
    env = mb.environment()
    label = "GPU" if ON_GPU else "CPU (reduced sizes: numbers only show that the suite runs)"
    return (f"mmfs_fast bench: {label}; profile {PROFILE.name} on {env['device']}; torch {env['torch']}, "
            f"triton {env['triton']}, CUDA {env['cuda']}, commit {env['git_commit']}; backends {env['backends']}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mmfs_fast"] = {**mb.environment(), "profile": PROFILE.name}


# Run order for a time-boxed run (bench/gpu_check.sh): whole groups of cases in order of
# interest (fp16 before bf16 before fp32, forward first, batch 1 first), torch.compile
# cases last because compiling costs more than measuring.
DTYPE_ORDER = {"fp16": 0, "bf16": 1, "fp32": 2}


def pytest_collection_modifyitems(config, items):
    def priority(item):
        params = item.callspec.params if hasattr(item, "callspec") else {}
        return ("compile" in item.name, DTYPE_ORDER.get(params.get("dtype"), 0), params.get("direction") == "fwdbwd",
                params.get("batch", float("inf")))

    items.sort(key=priority)


def _run_once(fn) -> float:
    start = mb.synced_timer()
    fn()
    return mb.synced_timer() - start


@pytest.fixture
def measure(benchmark):
    """measure(fn, group=..., rounds=..., **info) times ``fn``; returns its median seconds per call.

    The first call (compilation, autotuning, CUDA graph capture) is timed separately
    and reported as ``first_call_s``; a second call, also a warm-up, sets how many
    calls make one timed round. extra_info carries the environment, profile, ``info``
    and GPU memory: ``peak_memory_mib`` of the whole process (models of earlier cases
    included) and ``case_memory_mib``, the peak above what was allocated before the case
    (its inputs, activations, workspaces, CUDA graph pools).
    """
    def run(fn, *, group: str, rounds: int = ROUNDS, **info) -> float:
        benchmark._timer = mb.synced_timer  # synchronises CUDA before each reading
        benchmark.group = group
        allocated_before = mb.reset_peak_memory(DEVICE)
        first_call = _run_once(fn)
        per_call = _run_once(fn)
        iterations = max(1, min(MAX_ITERATIONS, int(ROUND_SECONDS / max(per_call, 1e-9))))
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations)
        benchmark.extra_info.update(mb.environment())
        peak = mb.peak_memory_mib(DEVICE)
        benchmark.extra_info.update(profile=PROFILE.name, first_call_s=first_call, peak_memory_mib=peak,
                                    case_memory_mib=None if peak is None else peak - allocated_before, **info)
        # --benchmark-disable (implied by xdist) runs fn once and keeps no stats: fall back to the warm call
        return benchmark.stats.stats.median if benchmark.stats else per_call

    return run
