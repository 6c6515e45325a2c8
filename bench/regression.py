"""The latency-regression gate of ``pytest bench/``: this run's cases against the committed
baseline of this device kind (bench/results/baseline/<kind>/*.json, pytest-benchmark JSON).

A case regresses when
- on a GPU (run and baseline on the same GPU), its median is slower than the baseline's by
  more than ``median_margin``;
- anywhere (noisy CPUs included), its speed-up over its reference in the same run (eager fp32
  on the same inputs: the eager-fp32-ref config of an end-to-end case, the fp32 ref impl of
  an op case) falls more than ``ratio_margin`` below the baseline's speed-up.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import peaks

BASELINES = Path(__file__).resolve().parent / "results" / "baseline"
MEDIAN_MARGIN = 0.15
# a GPU's speed-up over the reference is steady run to run; a shared CPU's, from 3 rounds, is not
RATIO_MARGIN = {"cuda": 0.25, "cpu": 0.5}
REFERENCE_CONFIG = "eager-fp32-ref"


@dataclass(frozen=True)
class Case:
    name: str
    median_s: float
    info: dict


def device_kind(device_name: str, device_type: str) -> str:
    """bench/results/baseline/<kind>: the GPU's bench/peaks.py entry ("h200"), or "cpu"."""
    if device_type != "cuda":
        return "cpu"
    key = next((key for key, _ in peaks.PEAKS if key in device_name), device_name)
    return key.lower().replace(" ", "-")


def load(paths) -> list[Case]:
    cases = []
    for path in paths:
        for b in json.loads(Path(path).read_text())["benchmarks"]:
            cases.append(Case(b["name"], b["stats"]["median"], b.get("extra_info", {})))
    return cases


def _reference_key(info: dict) -> tuple | None:
    """The key of the case that ``info``'s case is compared with in the same run."""
    if "scenario" in info and "batch" in info:
        return ("e2e", info["scenario"], info["batch"], REFERENCE_CONFIG)
    if "op" in info and "impl" in info:
        return ("op", info["op"], info.get("shape"), info.get("direction"), "ref", "fp32")
    return None


def _own_key(info: dict) -> tuple | None:
    if "scenario" in info and "batch" in info:
        return ("e2e", info["scenario"], info["batch"], info.get("config"))
    if "op" in info and "impl" in info:
        return ("op", info["op"], info.get("shape"), info.get("direction"), info["impl"], info.get("dtype"))
    return None


def speedups(cases: list[Case]) -> dict[str, float]:
    """name → reference median / case median, for the cases whose reference ran too."""
    by_key = {_own_key(c.info): c for c in cases if _own_key(c.info) is not None}
    out = {}
    for c in cases:
        ref = by_key.get(_reference_key(c.info))
        if ref is not None and ref is not c and c.median_s > 0:
            out[c.name] = ref.median_s / c.median_s
    return out


def regressions(current: list[Case], baseline: list[Case], same_gpu: bool,
                median_margin: float = MEDIAN_MARGIN, ratio_margin: float = RATIO_MARGIN["cuda"]) -> list[str]:
    """One line per regressed case of ``current``, naming it and by how much."""
    base = {c.name: c for c in baseline}
    found = []
    if same_gpu:
        for c in current:
            if c.name in base and c.median_s > base[c.name].median_s * (1 + median_margin):
                found.append(f"{c.name}: median {c.median_s * 1e3:.3f} ms vs baseline "
                             f"{base[c.name].median_s * 1e3:.3f} ms (> +{median_margin:.0%})")
    now, then = speedups(current), speedups(baseline)
    for name, speedup in now.items():
        if name in then and speedup < then[name] * (1 - ratio_margin):
            found.append(f"{name}: {speedup:.2f}× its eager fp32 reference vs {then[name]:.2f}× in the baseline "
                         f"(> -{ratio_margin:.0%})")
    return found
