"""The benchmark instrument itself (no timing asserts): the op-call catalogue against the
architecture, the summary arithmetic, the peak table, and a tiny real run of bench/."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfs_fast.models import StylizerConfig

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


op_shapes = load_bench_module("op_shapes")
peaks = load_bench_module("peaks")
summarize = load_bench_module("summarize")


def test_op_catalogue_matches_the_architecture():
    """SPEC §3-4 at 64² (ngf 8): per Stylizer forward 9 StyledConvs + 5 ToRGBs = 14 modulated
    convs, 4 of them upsampling, 4 FIR upsamplings of the RGB skip; the Discriminator's 4
    ResBlocks (64 → 4) blur twice each (conv2 and skip)."""
    calls = op_shapes.op_calls(StylizerConfig(size=64, ngf=8, style_dim=32), 64, 8, batches=(1, 3))
    assert {call.batch for call, _ in calls} == {1, 3}

    def count(model, op, batch, **options):
        return sum(uses.get(model, 0) for call, uses in calls if call.op == op and call.batch == batch
                   and all(dict(call.options)[k] == v for k, v in options.items()))

    for batch in (1, 3):
        assert count("stylizer", "modulated_conv2d", batch) == 14
        assert count("stylizer", "modulated_conv2d", batch, up=2) == 4
        assert count("stylizer", "modulated_conv2d", batch, demodulate=False) == 5
        assert count("stylizer", "upfirdn2d", batch, up=2) == 4
        assert count("discriminator", "upfirdn2d", batch) == 2 * 4
        assert count("discriminator", "modulated_conv2d", batch) == 0
    first_rgb = next(call for call, _ in calls if call.op == "modulated_conv2d" and call.batch == 1
                     and dict(call.shapes)["x"] == (1, 64, 4, 4) and not dict(call.options)["demodulate"])
    assert dict(first_rgb.shapes)["weight"] == (3, 64, 1, 1)
    assert first_rgb.label == "x1x64x4x4-o3k1-nodemod"


def test_op_call_replays_through_the_public_op():
    calls = op_shapes.op_calls(StylizerConfig(size=64, ngf=8, style_dim=32), 64, 8, batches=(2,))
    for call, _ in calls:
        args = call.make_args("cpu", torch.float32)
        out = op_shapes.PUBLIC_OPS[call.op](**args)  # on the CPU every op runs its plain torch form
        assert out.shape[0] == 2 and out.isfinite().all()


def test_peak_lookup_prefers_the_specific_name():
    assert peaks.peak_for("NVIDIA H100 PCIe").gbps == 2000
    assert peaks.peak_for("NVIDIA H100 80GB HBM3").gbps == 3350
    assert peaks.peak_for("CPU (x86_64, 2 cores)") is None
    assert peaks.fraction_of_peak("NVIDIA H100 80GB HBM3", "fp16", tflops=494.7) == pytest.approx(0.5)
    assert peaks.fraction_of_peak("NVIDIA H100 80GB HBM3", "fp32", gbps=335) == pytest.approx(0.1)


def _e2e(config, scenario, batch, seconds, **extra):
    return {"stats": {"median": seconds}, "extra_info": {"config": config, "scenario": scenario, "batch": batch,
                                                        "case_memory_mib": 100.0, **extra}}


def test_summary_speedups_and_targets():
    benchmarks = [_e2e("eager-fp32-ref", "random_sampling", 1, 8e-3), _e2e("compile-fp32-ref", "random_sampling", 1, 2e-3),
                  _e2e("mmfs-fast", "random_sampling", 1, 1e-3), _e2e("mmfs-fast", "random_sampling", 32, 0.016),
                  _e2e("mmfs-fast", "finetune", 8, 1.0, steps=10, seconds_per_step=0.1, projected_200_steps_s=20.0)]
    text = summarize.summarize(benchmarks, {"device": "NVIDIA H100 80GB HBM3", "profile": "gpu-512",
                                            "device_type": "cuda"})
    row = next(line for line in text.splitlines() if line.startswith("| random_sampling | 1 |"))
    assert row == "| random_sampling | 1 | 8.000 | 2.000 | 1.000 | 1000.0 | 8.00× | 2.00× | 100 | 15.59 |"
    assert "| random sampling, batch 32 | ≥ 2000 img/s | 2000 img/s | yes |" in text
    assert "| random sampling, batch 1 | ≤ 1.0 ms | 1.000 ms | yes |" in text
    assert "| 200-step fine-tune (projected) | ≤ 15 s | 20.0 s | no |" in text
    cpu = summarize.summarize(benchmarks, {"device": "CPU", "profile": "cpu-reduced-64", "device_type": "cpu"})
    assert "**CPU run at reduced sizes" in cpu and "| yes |" not in cpu


def test_bench_suite_runs_on_cpu(tmp_path):
    """Two real op groups and one end-to-end case of bench/ at CPU scale, then their summary."""
    out = tmp_path / "bench.json"
    # under pytest-xdist, a child pytest that inherits its variables turns pytest-benchmark off
    without_xdist = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    run = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "test_bench_ops.py"), str(BENCH / "test_bench_e2e.py"),
                          "-q", "-p", "no:cacheprovider", "-k", "(bias_act and ref and not fwdbwd) or (eager-fp32-ref and guided_stylization-1)",
                          f"--benchmark-json={out}"], capture_output=True, text=True, timeout=300,
                         cwd=BENCH.parent, env=without_xdist)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    assert {i.get("op") for i in infos} == {"bias_act", None}
    assert all(i["profile"] == "cpu-reduced-64" and i["device_type"] == "cpu" for i in infos)
    assert data["machine_info"]["mmfs_fast"]["profile"] == "cpu-reduced-64"
    md = tmp_path / "summary.md"
    assert summarize.main([str(out), "-o", str(md)]) == 0
    text = md.read_text()
    assert "| guided_stylization | 1 |" in text and "| bias_act | 1 | fp32 | fwd |" in text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mmfs_fast_bench_cli_reports_every_workload(precision, capsys):
    from mmfs_fast.cli import main

    assert main(["bench", "--device", "cpu", "--batch-sizes", "1", "--rounds", "1", "--precision", precision]) == 0
    out, err = capsys.readouterr()
    assert "NOTICE: random-initialised" in err and "cpu-reduced-64" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| 1 |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == ["image_to_wplus", "text_to_wplus", "random_sampling",
                                                         "guided_stylization"]


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu", "--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--device", "cpu", "--rounds", "-1"], "--rounds must be >= 1"),
    (["--device", "cpu", "--ckpt", "/nonexistent/model.pt"], "model.pt"),
])
def test_mmfs_fast_bench_cli_rejects_bad_options(argv, message, capsys):
    from mmfs_fast.cli import main

    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_and_serve_tables():
    def train(case, stage, r1, seconds):
        return {"stats": {"median": seconds}, "extra_info": {
            "task": "train", "case": case, "stage": stage, "r1": r1, "r1_every": 16, "size": 512, "batch": 8,
            "precision": "bf16", "seconds_per_iter": seconds, "iters_per_s": 1 / seconds}}

    rows = summarize.train_table([train("2", "2", False, 0.5), train("2+r1", "2", True, 2.1)])
    # lazy R1: one step in 16 pays the R1 cost, 0.5 + (2.1 - 0.5) / 16 = 0.6 s/iter
    assert rows[-1] == "| 2 (R1 every 16, amortised) | 512² | 8 | bf16 | 0.600 | 1.67 |"
    serve = summarize.serve_table([{"stats": {"median": 1.0}, "extra_info": {
        "task": "serve", "concurrency": c, "requests": 64, "requests_per_s": 64.0 * c, "p50_ms": 10.0 / c,
        "p99_ms": 20.0 / c, "size": 512}} for c in (8, 1)])
    assert [line.split("|")[1].strip() for line in serve[2:]] == ["1", "8"]  # sorted by concurrency
    assert summarize.serve_table([]) == [] and summarize.train_table([]) == []


def test_engine_variants_table():
    e2e = summarize.e2e_index([_e2e("mmfs-fast", "guided_stylization", 1, 3e-3),
                               _e2e("mmfs-fast-fused", "guided_stylization", 1, 25e-3),
                               _e2e("mmfs-fast-fused", "guided_stylization", 32, 0.7),
                               _e2e("eager-fp32-ref", "guided_stylization", 1, 8e-3)])
    rows = summarize.variants_table(e2e)
    assert rows[0] == "| workload | batch | mmfs-fast ms | mmfs-fast-fused ms |"
    assert rows[2:] == ["| guided_stylization | 1 | 3.000 | 25.00 |", "| guided_stylization | 32 | – | 700.00 |"]
    assert summarize.variants_table(summarize.e2e_index([_e2e("mmfs-fast", "guided_stylization", 1, 3e-3)])) == []


def test_profile_engine_writes_its_table(tmp_path):
    out = tmp_path / "profile.txt"
    run = subprocess.run([sys.executable, str(BENCH / "profile_engine.py"), "--batch", "1", "-o", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("Engine guided stylization, cpu-reduced-64, fp32, batch 1")
    assert "aten::" in text and "# of Calls" in text
    bad = subprocess.run([sys.executable, str(BENCH / "profile_engine.py"), "--batch", "0"],
                         capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert bad.returncode == 2 and "--batch takes positive sizes" in bad.stderr
