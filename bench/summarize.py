"""Markdown summary of pytest-benchmark JSON files written by `pytest bench/`.

    python bench/summarize.py RESULT.json [MORE.json ...] [-o summary.md]

Tables: the targets (as tracked in README), end to end (ms, img/s, speed-up against
eager fp32 and torch.compile, peak memory), fine-tuning, the HTTP service (req/s,
p50/p99), faces (faces/s, video fps), training (s/iter per stage), and per op (time per model
forward, speed-up against ref, fraction of the GPU's peak), then every op case.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

BASELINE, COMPILED, FASTEST = "eager-fp32-ref", "compile-fp32-ref", "mmfs-fast"
SCENARIOS = ("image_to_wplus", "text_to_wplus", "random_sampling", "guided_stylization")
PAPER_V100_MS = {"image_to_wplus": 6.54, "text_to_wplus": 6.59, "random_sampling": 15.59,
                 "guided_stylization": 15.85}
PAPER_V100_S_PER_ITER = 1.8  # training, SPEC §6 / issue 9
OP_IMPLS = ("ref", "compile", "cuda", "triton")


def load(paths: list[str]) -> tuple[list[dict], dict]:
    """All benchmarks of the files, and the mmfs_fast environment of the first one."""
    benchmarks, env = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        benchmarks += data["benchmarks"]
        env = env or data.get("machine_info", {}).get("mmfs_fast", {})
    return benchmarks, env


def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def ms_unit(seconds: float) -> str:
    return f"{ms(seconds)} ms"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}×"


def percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def median(bench: dict) -> float:
    return bench["stats"]["median"]


def e2e_index(benchmarks: list[dict]) -> dict[tuple[str, str, int], dict]:
    """(config, scenario, batch) → benchmark, for end-to-end and fine-tune results."""
    return {(b["extra_info"]["config"], b["extra_info"]["scenario"], b["extra_info"]["batch"]): b
            for b in benchmarks if "scenario" in b["extra_info"]}


def targets_table(e2e: dict, judge: bool) -> list[str]:
    """The README targets; ``judge`` says whether to mark them met (only meaningful at 512² on a GPU)."""
    def t(scenario, batch, config=FASTEST):
        bench = e2e.get((config, scenario, batch))
        return median(bench) if bench else None

    def speedups(against: str) -> list[float]:
        return [t(s, 1, against) / t(s, 1) for s in SCENARIOS if t(s, 1) and t(s, 1, against)]

    finetunes = [b for (config, scenario, _), b in e2e.items() if config == FASTEST and scenario == "finetune"]
    fine_tune = finetunes[0]["extra_info"]["projected_200_steps_s"] if finetunes else None
    b32 = t("random_sampling", 32)
    rows = [
        ("image → w+, batch 1", "≤ 0.5 ms", t("image_to_wplus", 1), lambda v: v <= 0.5e-3, ms_unit),
        ("text → w+, batch 1", "≤ 0.5 ms", t("text_to_wplus", 1), lambda v: v <= 0.5e-3, ms_unit),
        ("random sampling, batch 1", "≤ 1.0 ms", t("random_sampling", 1), lambda v: v <= 1.0e-3, ms_unit),
        ("random sampling, batch 32", "≥ 2000 img/s", 32 / b32 if b32 else None, lambda v: v >= 2000,
         lambda v: f"{v:.0f} img/s"),
        ("guided stylization, batch 1", "≤ 1.2 ms", t("guided_stylization", 1), lambda v: v <= 1.2e-3, ms_unit),
        ("200-step fine-tune (projected)", "≤ 15 s", fine_tune, lambda v: v <= 15, lambda v: f"{v:.1f} s"),
        ("speed-up vs eager fp32, batch 1 (worst scenario)", "≥ 8×", min(speedups(BASELINE), default=None),
         lambda v: v >= 8, lambda v: f"{v:.2f}×"),
        ("speed-up vs torch.compile, batch 1 (worst scenario)", "≥ 1.3×", min(speedups(COMPILED), default=None),
         lambda v: v >= 1.3, lambda v: f"{v:.2f}×"),
    ]
    lines = ["| target (H100, 512²) | goal | mmfs-fast | met |", "|---|---|---:|:-:|"]
    for name, goal, value, ok, fmt in rows:
        met = "–" if value is None or not judge else "yes" if ok(value) else "no"
        lines.append(f"| {name} | {goal} | {'–' if value is None else fmt(value)} | {met} |")
    return lines


def e2e_table(e2e: dict) -> list[str]:
    lines = ["| workload | batch | eager fp32 ms | torch.compile ms | mmfs-fast ms | mmfs-fast img/s | "
             "× eager | × compile | case MiB | paper V100 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batches = sorted({batch for (_, scenario, batch) in e2e if scenario in SCENARIOS})
    for scenario in SCENARIOS:
        for batch in batches:
            times = {c: median(e2e[c, scenario, batch]) if (c, scenario, batch) in e2e else None
                     for c in (BASELINE, COMPILED, FASTEST)}
            if not any(times.values()):
                continue
            fast = e2e.get((FASTEST, scenario, batch))
            mem = fast["extra_info"].get("case_memory_mib") if fast else None
            paper = PAPER_V100_MS[scenario] if batch == 1 else None
            fast_time = times[FASTEST]
            images_per_s = f"{batch / fast_time:.1f}" if fast_time else "–"
            lines.append(f"| {scenario} | {batch} | {ms(times[BASELINE])} | {ms(times[COMPILED])} | {ms(fast_time)} | "
                         f"{images_per_s} | {ratio(times[BASELINE], fast_time)} | {ratio(times[COMPILED], fast_time)} | "
                         f"{'–' if mem is None else f'{mem:.0f}'} | {'–' if paper is None else paper} |")
    return lines


def variants_table(e2e: dict) -> list[str]:
    """The Engine's variants beside its defaults (FASTEST), for each workload one of them ran."""
    variants = sorted({c for (c, scenario, _) in e2e if c.startswith(f"{FASTEST}-") and scenario in SCENARIOS})
    if not variants:
        return []
    configs = [FASTEST, *variants]
    rows = sorted({(scenario, batch) for (c, scenario, batch) in e2e if c in variants},
                  key=lambda row: (SCENARIOS.index(row[0]), row[1]))
    lines = ["| workload | batch | " + " | ".join(f"{c} ms" for c in configs) + " |",
             "|---|---:|" + "---:|" * len(configs)]
    for scenario, batch in rows:
        cells = [ms(median(e2e[c, scenario, batch])) if (c, scenario, batch) in e2e else "–" for c in configs]
        lines.append(f"| {scenario} | {batch} | " + " | ".join(cells) + " |")
    return lines


def finetune_table(e2e: dict) -> list[str]:
    rows = [b for (_, scenario, _), b in e2e.items() if scenario == "finetune"]
    lines = ["| config | batch | steps timed | s per step | projected 200 steps s | case MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for b in sorted(rows, key=lambda b: b["extra_info"]["config"]):
        info = b["extra_info"]
        mem = info.get("case_memory_mib")
        lines.append(f"| {info['config']} | {info['batch']} | {info['steps']} | {info['seconds_per_step']:.3f} | "
                     f"{info['projected_200_steps_s']:.1f} | {'–' if mem is None else f'{mem:.0f}'} |")
    return lines if rows else []


def op_tables(benchmarks: list[dict]) -> tuple[list[str], list[str]]:
    """Per (op, batch, dtype, direction): the time of all the op's calls in one forward of
    each model (median × uses, summed over shapes), for each impl; then every case."""
    ops = [b for b in benchmarks if "op" in b["extra_info"]]
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for b in ops:
        info = b["extra_info"]
        groups[info["op"], info["batch"], info["dtype"], info["direction"]][info["impl"]].append(b)
    summary = ["| op | batch | dtype | direction | " + " | ".join(f"{i} ms" for i in OP_IMPLS) +
               " | best × ref | best impl median % of peak |",
               "|---|---:|---|---|" + "---:|" * len(OP_IMPLS) + "---:|---:|"]
    for (op, batch, dtype, direction), by_impl in sorted(groups.items()):
        shapes = {b["extra_info"]["shape"] for b in by_impl.get("ref", [])}

        def per_forward(impl):
            cases = {b["extra_info"]["shape"]: b for b in by_impl.get(impl, [])}
            if not shapes or set(cases) != shapes:  # compile covers only some shapes: no total
                return None
            return sum(median(b) * sum(b["extra_info"]["uses"].values()) for b in cases.values())

        totals = {impl: per_forward(impl) for impl in OP_IMPLS}
        timed = {impl: t for impl, t in totals.items() if t is not None}
        best = min(timed, key=timed.get) if timed else None
        fractions = [b["extra_info"].get("fraction_of_peak") for b in by_impl.get(best, [])]
        fractions = [f for f in fractions if f is not None]
        summary.append(f"| {op} | {batch} | {dtype} | {direction} | " +
                       " | ".join(ms(totals[i]) for i in OP_IMPLS) +
                       f" | {ratio(totals['ref'], timed.get(best))} ({best}) | "
                       f"{percent(statistics.median(fractions) if fractions else None)} |")
    detail = ["| op | shape | dtype | direction | impl | ms | TFLOP/s or GB/s | % of peak | uses |",
              "|---|---|---|---|---|---:|---:|---:|---|"]
    for b in sorted(ops, key=lambda b: tuple(str(b["extra_info"][k]) for k in
                                             ("op", "shape", "dtype", "direction", "impl"))):
        info = b["extra_info"]
        rate = f"{info['tflops']:.1f} TFLOP/s" if "tflops" in info else f"{info['gbps']:.0f} GB/s"
        uses = ", ".join(f"{model}×{n}" for model, n in info["uses"].items())
        detail.append(f"| {info['op']} | {info['shape']} | {info['dtype']} | {info['direction']} | {info['impl']} | "
                      f"{ms(median(b))} | {rate} | {percent(info.get('fraction_of_peak'))} | {uses} |")
    return (summary, detail) if ops else ([], [])


def by_task(benchmarks: list[dict], *tasks: str) -> list[dict]:
    return [b for b in benchmarks if b["extra_info"].get("task") in tasks]


def serve_table(benchmarks: list[dict]) -> list[str]:
    rows = sorted(by_task(benchmarks, "serve"), key=lambda b: b["extra_info"]["concurrency"])
    lines = ["| concurrent clients | requests per round | req/s | p50 ms | p99 ms | face size |",
             "|---:|---:|---:|---:|---:|---:|"]
    for b in rows:
        info = b["extra_info"]
        lines.append(f"| {info['concurrency']} | {info['requests']} | {info['requests_per_s']:.1f} | "
                     f"{info['p50_ms']:.1f} | {info['p99_ms']:.1f} | {info['size']}² |")
    return lines if rows else []


def faces_table(benchmarks: list[dict]) -> list[str]:
    rows = by_task(benchmarks, "detect_align", "video")
    lines = ["| task | input | ms per photo or clip | rate |", "|---|---|---:|---:|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["task"], b["extra_info"].get("faces", 0))):
        info = b["extra_info"]
        if info["task"] == "detect_align":
            what = f"{info['photo']} photo, {info['faces']} face(s) → {info['crop']}² crops"
            rate = f"{info['faces_per_s']:.1f} faces/s"
        else:
            what = f"{info['frames']} frames of {info['frame']}, {info['size']}² model, {info['precision']}"
            rate = f"{info['fps']:.1f} fps"
        lines.append(f"| {info['task']} | {what} | {ms(median(b))} | {rate} |")
    return lines if rows else []


def train_table(benchmarks: list[dict]) -> list[str]:
    """s/iter per stage; Stage II with its lazy R1 amortised (one R1 step in every r1_every)."""
    rows = {b["extra_info"]["case"]: b for b in by_task(benchmarks, "train")}
    lines = ["| stage | size | batch | precision | s/iter | iter/s |", "|---|---:|---:|---|---:|---:|"]
    for _, b in sorted(rows.items()):
        info = b["extra_info"]
        label = f"{info['stage']}" + (" (an R1 step)" if info["r1"] else "")
        lines.append(f"| {label} | {info['size']}² | {info['batch']} | {info['precision']} | "
                     f"{info['seconds_per_iter']:.3f} | {info['iters_per_s']:.2f} |")
    if "2" in rows and "2+r1" in rows:
        info, every = rows["2"]["extra_info"], rows["2"]["extra_info"]["r1_every"]
        plain, r1 = info["seconds_per_iter"], rows["2+r1"]["extra_info"]["seconds_per_iter"]
        amortised = plain + (r1 - plain) / every
        lines.append(f"| 2 (R1 every {every}, amortised) | {info['size']}² | {info['batch']} | {info['precision']} | "
                     f"{amortised:.3f} | {1 / amortised:.2f} |")
    return lines if rows else []


def summarize(benchmarks: list[dict], env: dict) -> str:
    e2e = e2e_index(benchmarks)
    cpu = env.get("device_type") == "cpu"
    out = [f"# mmfs_fast benchmarks: {env.get('device', '?')}", ""]
    if cpu:
        out += ["**CPU run at reduced sizes (profile {}): these numbers only show that the suite runs; "
                "they say nothing about GPU performance.**".format(env.get("profile")), ""]
    out += [f"profile {env.get('profile')} · commit {env.get('git_commit')} · torch {env.get('torch')} · "
            f"CUDA {env.get('cuda')} · triton {env.get('triton')} · python {env.get('python')} · "
            f"op backends {env.get('backends')}", "",
            "Times are medians. mmfs-fast: the Engine (fp16, CUDA graphs on a GPU); eager fp32: the plain "
            "Stylizer + CLIP on the pure-PyTorch ops (the stand-in for the official code). case MiB: peak GPU "
            "memory of the case above what was allocated before it (activations, workspaces, CUDA graph pools; "
            "weights loaded earlier excluded).", ""]
    if e2e:
        out += ["## Targets", ""] + targets_table(e2e, judge=env.get("profile") == "gpu-512") + ["", "## End to end", ""] + e2e_table(e2e) + [""]
        variants = variants_table(e2e)
        out += ["## Engine variants", ""] + variants + [""] if variants else []
        fine = finetune_table(e2e)
        out += ["## Fine-tuning", ""] + fine + [""] if fine else []
    serve, faces, train = serve_table(benchmarks), faces_table(benchmarks), train_table(benchmarks)
    if serve:
        out += ["## HTTP service: POST /v1/stylize (seed styles)", ""] + serve + [""]
    if faces:
        out += ["## Faces: detection + alignment, video", ""] + faces + [""]
    if train:
        out += ["## Training: one iteration (train_step + EMA)", "",
                f"Paper: ≈ {PAPER_V100_S_PER_ITER} s/iter on a V100 at 512², batch 8.", ""] + train + [""]
    summary, detail = op_tables(benchmarks)
    if summary:
        out += ["## Ops: time of all calls in one Stylizer + Discriminator forward", "",
                "(torch.compile runs on the heaviest call only, so it has no total here; see the cases below.)", ""]
        out += summary + ["", "<details><summary>every op case</summary>", ""] + detail + ["", "</details>", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        benchmarks, env = load(args.json)
    except (OSError, ValueError, KeyError) as e:
        print(f"summarize: cannot read benchmark JSON: {e}", file=sys.stderr)
        return 2
    text = summarize(benchmarks, env)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
