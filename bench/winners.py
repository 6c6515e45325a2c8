"""Per-op, per-shape backend winners from a run of bench/test_bench_ops.py, written to
mmfs_fast/ops/winners.json, the file the dispatcher's "auto" order (ops/_backend.py) and
bench/cost_model.py read. Only kernel impls compete (ref, cuda, triton); torch.compile is
measured beside them but is not a backend. The "upsample", "downsample" and "stem" entries rank
the two forms of the decoder's upsampling, the encoder's downsampling and its first convolution
(test_upsample_form's, test_downsample_form's and test_stem_form's cases, ops named by the kind)
the same way, per "I x O @ H" shape over every batch and dtype measured."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from mmfs_fast.ops._backend import CONV_FORMS

WINNERS_FILE = Path(__file__).resolve().parents[1] / "mmfs_fast" / "ops" / "winners.json"
BACKENDS = ("cuda", "triton", "ref")


def winners(cases: list[dict], device: str, commit: str | None) -> dict:
    """cases: {"op", "impl", "dtype", "direction", "shape", "median_s"} each; returns the
    winners.json content: per op, each (shape, dtype, direction)'s impls fastest first, and
    the op's order: by shapes won, then by total time."""
    timed: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for case in cases:
        if case["impl"] in BACKENDS:
            key = f"{case['shape']} {case['dtype']} {case['direction']}"
            timed[case["op"]][key][case["impl"]] = case["median_s"]
    current = json.loads(WINNERS_FILE.read_text())
    for kind in CONV_FORMS:  # the resampling convolutions' entries
        forms: dict[str, Counter] = defaultdict(Counter)
        for case in cases:
            if case["op"] == kind:
                forms[case["shape"]][case["impl"]] += case["median_s"]
        if forms:
            ranked = {shape: sorted(times, key=times.get) for shape, times in forms.items()}
            wins = Counter(order[0] for order in ranked.values())
            total = sum(forms.values(), Counter())
            current[kind].pop("predicted", None)
            current[kind].update(order=sorted(total, key=lambda f: (-wins[f], total[f])), shapes=ranked,
                                 measured=f"{device}, commit {commit}, bench/test_bench_ops.py::test_{kind}_form")
    for op, shapes in timed.items():
        ranked = {key: sorted(times, key=times.get) for key, times in shapes.items()}
        wins = Counter(order[0] for order in ranked.values())
        total = Counter()
        for times in shapes.values():
            total.update(times)
        order = sorted({impl for times in shapes.values() for impl in times}, key=lambda i: (-wins[i], total[i]))
        # implemented but not installed there: after the measured ones, in their old order
        order += [impl for impl in current["ops"].get(op, {}).get("order", BACKENDS) if impl not in order]
        current["ops"][op] = {"order": order, "measured": f"{device}, commit {commit}, bench/test_bench_ops.py",
                              "shapes": ranked}
    return current


def write(cases: list[dict], device: str, commit: str | None, path: Path = WINNERS_FILE) -> Path:
    path.write_text(json.dumps(winners(cases, device, commit), indent=1) + "\n")
    return path
