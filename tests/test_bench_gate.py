"""The latency-regression gate of `pytest bench/` (bench/regression.py) and the op winners
it writes (bench/winners.py): a slower case than the baseline fails, an equal one passes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import regression  # noqa: E402
import winners  # noqa: E402


def e2e(config: str, median_s: float, scenario: str = "guided_stylization", batch: int = 1) -> regression.Case:
    return regression.Case(f"test_e2e[{config}-{scenario}-{batch}]", median_s,
                           {"config": config, "scenario": scenario, "batch": batch})


BASELINE = [e2e("eager-fp32-ref", 8e-3), e2e("mmfs-fast", 3e-3)]


def test_an_equal_run_passes():
    assert regression.regressions(BASELINE, BASELINE, same_gpu=True) == []


def test_a_slower_median_fails_on_the_same_gpu_and_names_the_case():
    slower = [e2e("eager-fp32-ref", 8e-3), e2e("mmfs-fast", 3e-3 * 1.2)]
    (line,) = regression.regressions(slower, BASELINE, same_gpu=True, median_margin=0.15, ratio_margin=0.5)
    assert line.startswith("test_e2e[mmfs-fast-guided_stylization-1]") and "median" in line
    assert regression.regressions(slower, BASELINE, same_gpu=True, median_margin=0.25, ratio_margin=0.5) == []


def test_elsewhere_only_the_speedup_over_the_same_run_reference_counts():
    # a machine twice as slow overall: no regression; the case alone 2x slower: one
    everything_slower = [e2e("eager-fp32-ref", 16e-3), e2e("mmfs-fast", 6e-3)]
    assert regression.regressions(everything_slower, BASELINE, same_gpu=False) == []
    case_slower = [e2e("eager-fp32-ref", 8e-3), e2e("mmfs-fast", 6e-3)]
    (line,) = regression.regressions(case_slower, BASELINE, same_gpu=False, ratio_margin=0.25)
    assert "1.33× its eager fp32 reference vs 2.67×" in line


def test_op_cases_compare_with_the_fp32_ref_impl_of_the_same_shape():
    def op(impl, dtype, median_s):
        return regression.Case(f"test_op[{impl}-{dtype}]", median_s, {"op": "bias_act", "impl": impl, "dtype": dtype,
                                                                      "shape": "b1", "direction": "fwd"})
    base = [op("ref", "fp32", 1e-3), op("cuda", "fp16", 1e-4)]
    assert regression.speedups(base) == {"test_op[cuda-fp16]": pytest.approx(10.0)}
    assert regression.regressions([op("ref", "fp32", 1e-3), op("cuda", "fp16", 2e-4)], base, same_gpu=False)


def test_device_kind_names_the_baseline_directory():
    assert regression.device_kind("NVIDIA H200", "cuda") == "h200"
    assert regression.device_kind("NVIDIA H100 80GB HBM3", "cuda") == "h100"
    assert regression.device_kind("CPU (x86_64, 2 cores)", "cpu") == "cpu"
    assert (regression.BASELINES / "h200" / "e2e.json").is_file()


def test_winners_order_each_op_by_shapes_won(tmp_path, monkeypatch):
    start = tmp_path / "winners.json"
    start.write_text(winners.WINNERS_FILE.read_text())
    monkeypatch.setattr(winners, "WINNERS_FILE", start)

    def case(impl, shape, median_s):
        return {"op": "upfirdn2d", "impl": impl, "dtype": "fp16", "direction": "fwd", "shape": shape,
                "median_s": median_s}
    cases = [case("cuda", "a", 1.0), case("triton", "a", 2.0), case("ref", "a", 3.0),
             case("cuda", "b", 5.0), case("triton", "b", 1.0), case("ref", "b", 3.0),
             case("cuda", "c", 5.0), case("triton", "c", 1.0), case("ref", "c", 3.0),
             {**case("compile", "c", 0.1)}]  # torch.compile is not a backend
    written = json.loads(winners.write(cases, "NVIDIA H200", "abc", start).read_text())
    entry = written["ops"]["upfirdn2d"]
    assert entry["order"] == ["triton", "cuda", "ref"]
    assert entry["shapes"]["a fp16 fwd"] == ["cuda", "triton", "ref"]
    assert written["ops"]["bias_act"] == json.loads(winners.WINNERS_FILE.read_text())["ops"]["bias_act"]


@pytest.mark.parametrize("kind", ["upsample", "downsample"])
def test_winners_rank_the_resampling_forms_per_shape_over_batches(tmp_path, monkeypatch, kind):
    from mmfs_fast.ops import _backend

    start = tmp_path / "winners.json"
    start.write_text(winners.WINNERS_FILE.read_text())
    monkeypatch.setattr(winners, "WINNERS_FILE", start)
    training, other = _backend.CONV_FORMS[kind]

    def case(form, shape, batch, median_s):
        return {"op": kind, "impl": form, "dtype": "fp16", "direction": "fwd", "shape": shape, "batch": batch,
                "median_s": median_s}
    # 8x8@16: the other form faster at batch 1, slower in sum (batch 32 dominates)
    cases = [case(other, "8x8@16", 1, 1.0), case(training, "8x8@16", 1, 2.0),
             case(other, "8x8@16", 32, 9.0), case(training, "8x8@16", 32, 5.0),
             case(other, "4x4@64", 1, 1.0), case(training, "4x4@64", 1, 3.0),
             case(other, "2x2@128", 1, 1.0), case(training, "2x2@128", 1, 3.0)]
    before = json.loads(winners.WINNERS_FILE.read_text())
    written = json.loads(winners.write(cases, "NVIDIA H200", "abc", start).read_text())
    entry = written[kind]
    assert entry["shapes"] == {"8x8@16": [training, other], "4x4@64": [other, training], "2x2@128": [other, training]}
    assert entry["order"] == [other, training] and "abc" in entry["measured"] and "predicted" not in entry
    assert written["ops"] == before["ops"]  # no op case: untouched
    untouched = next(k for k in _backend.CONV_FORMS if k != kind)
    assert written[untouched] == before[untouched]


def test_resampling_form_per_shape_falls_back_to_the_default_order(monkeypatch):
    from mmfs_fast.ops import _backend

    monkeypatch.setitem(_backend._CONV_FORM_WINNERS, "upsample", {
        "order": ["transposed", "polyphase"], "shapes": {"8x4@16": ["polyphase", "transposed"]}})
    assert _backend.conv_form("upsample", 8, 4, 16) == "polyphase"
    assert _backend.conv_form("upsample", 8, 4, 32) == "transposed"
    assert _backend.form_wins_somewhere("upsample", "polyphase", 8, 4)
    assert not _backend.form_wins_somewhere("upsample", "polyphase", 8, 8)
    assert not _backend.form_wins_somewhere("upsample", "polyphase", 8, 41)  # "8x41@" does not start with "8x4@"
    assert _backend.form_wins_somewhere("upsample", "transposed", 8, 8)  # the default order's first


def test_the_engine_folds_the_downsampling_blurs_where_winners_say_so():
    """winners.json's downsample entry as shipped (the cost model's prediction): folded at the
    512² and 256² ResBlocks of the 512² encoder, blurred at the smaller ones."""
    from mmfs_fast.ops import _backend

    assert [_backend.conv_form("downsample", i, o, h) for i, o, h in
            ((64, 64, 512), (64, 128, 256), (128, 256, 128), (256, 512, 64))] == ["folded", "folded", "blurred", "blurred"]


def test_the_dispatcher_reads_its_order_from_the_winners_file():
    from mmfs_fast.ops import _backend

    committed = json.loads(_backend.WINNERS_FILE.read_text())
    assert _backend.FASTEST_FIRST == tuple(committed["default"])
    for op, entry in committed["ops"].items():
        assert _backend.fastest_first(op) == tuple(entry["order"])
