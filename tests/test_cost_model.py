"""The cost model (bench/cost_model.py) and the structural gates it gives CI: what one 512²
guided stylization launches on the Engine's CUDA path, counted on fake CUDA tensors (no GPU,
no memory). A change that adds a kernel, a memory pass, a host sync or a layout copy fails
here; a change that removes some must lower the bound (the values are today's)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cost_model as cm  # noqa: E402

# today's totals of the 512² guided stylization (fp16, Engine defaults), per batch size
GUIDED_BOUNDS = {
    1: {"kernels": 74, "bytes_per_image": 1.110e9, "cudnn_transposes": 0},
    32: {"kernels": 74, "bytes_per_image": 1.052e9, "cudnn_transposes": 0},
}

# kernels of a style from a prompt or a reference image at batch 1 (CLIP fp16, the clip_mapper fp32)
STYLE_BOUNDS = {"text_to_wplus": 131, "image_to_wplus": 129}


def record(fn) -> list[cm.Kernel]:
    with cm.fake_cuda() as recorder:
        with recorder.record() as kernels:
            fn()
    return kernels


# -- the counting, against closed-form costs ------------------------------------------------

def test_convolution_costs_its_closed_form():
    def fn():
        x = torch.empty(2, 16, 32, 32, device="cuda", dtype=torch.float16)
        w = torch.empty(8, 16, 3, 3, device="cuda", dtype=torch.float16)
        torch.nn.functional.conv2d(x, w, padding=1)

    (conv,) = record(fn)
    assert conv.op == "convolution" and conv.kernels == 1 and conv.tensor_cores and conv.dtype == "fp16"
    assert conv.flops == 2 * (2 * 8 * 32 * 32) * 16 * 9
    # in + weight + out, and the NCHW↔NHWC transposes of input and output (2 passes each)
    io = (2 * 16 * 32 * 32 + 8 * 16 * 9 + 2 * 8 * 32 * 32) * 2
    assert conv.transpose_bytes == 2 * (2 * 16 * 32 * 32 + 2 * 8 * 32 * 32) * 2
    assert conv.bytes == io + conv.transpose_bytes and conv.cudnn_transposes == 2


def test_convolution_bias_is_a_pass_of_its_own_and_channels_last_has_no_transposes():
    def fn():
        x = torch.empty(1, 16, 8, 8, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = torch.empty(8, 16, 1, 1, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        torch.nn.functional.conv2d(x, w, torch.empty(8, device="cuda", dtype=torch.float16))

    kernels = record(fn)
    conv = next(k for k in kernels if k.op == "convolution")
    assert conv.kernels == 2 and conv.cudnn_transposes == 0
    # the input's .to(channels_last); a 1×1 weight's NHWC is the same memory order, no conversion
    assert sum(k.layout_conversions for k in kernels) == 1


def test_elementwise_bytes_count_a_broadcast_input_once():
    def fn():
        x = torch.empty(4, 8, 16, 16, device="cuda")
        noise = torch.empty(1, 1, 16, 16, device="cuda").expand(4, 1, 16, 16)
        x.add_(noise)

    (add,) = record(fn)
    assert add.kernels == 1 and add.bytes == (4 * 8 * 256 + 256 + 4 * 8 * 256) * 4


def test_an_out_buffer_counts_once_as_the_written_output():
    def fn():
        x = torch.empty(4, 8, 16, 16, device="cuda", dtype=torch.float16)
        s = torch.empty(4, 8, 1, 1, device="cuda")
        torch.mul(x, s, out=torch.empty_like(x))

    (mul,) = record(fn)
    assert mul.kernels == 1 and mul.bytes == 4 * 8 * 256 * 2 + 4 * 8 * 4 + 4 * 8 * 256 * 2


def test_a_matmuls_added_input_is_a_copy_unless_it_is_the_output_or_a_bias():
    """cuBLAS adds C from the output buffer: out of place, ATen copies the addend there first (a
    second kernel), except a bias of one value per column, which cuBLASLt adds in its epilogue;
    in place the output is the addend and nothing is copied."""
    m, k, n = 64, 32, 16
    a = lambda *shape: torch.empty(*shape, device="cuda", dtype=torch.float16)  # noqa: E731
    calls = {
        "bias": lambda: torch.addmm(a(n), a(m, k), a(k, n)),
        "row bias": lambda: torch.addmm(a(1, n), a(m, k), a(k, n)),
        "scaled bias": lambda: torch.addmm(a(n), a(m, k), a(k, n), beta=2.0),
        "matrix": lambda: torch.addmm(a(m, n), a(m, k), a(k, n)),
        "matrix in place": lambda: a(m, n).addmm_(a(m, k), a(k, n)),
        "batched bias": lambda: torch.baddbmm(a(1, 1, n), a(2, m, k), a(2, k, n)),
        "batched in place": lambda: a(2, m, n).baddbmm_(a(2, m, k), a(2, k, n)),
    }
    counted = {name: [k for k in record(call) if k.tensor_cores] for name, call in calls.items()}
    kernels = {name: sum(k.kernels for k in ks) for name, ks in counted.items()}
    assert kernels == {"bias": 1, "row bias": 1, "scaled bias": 2, "matrix": 2, "matrix in place": 1,
                       "batched bias": 2, "batched in place": 1}
    (matrix,), (in_place,) = counted["matrix"], counted["matrix in place"]
    assert matrix.flops == in_place.flops == 2 * m * k * n
    # the copy reads the addend and writes the output; the GEMM then reads and writes the output
    assert matrix.bytes == in_place.bytes + 2 * m * n * 2


def test_host_reads_are_syncs_and_permuted_copies_are_layout_conversions():
    def fn():
        x = torch.empty(2, 3, 4, 5, device="cuda")
        bool(torch.isfinite(x).all())
        x.permute(0, 2, 3, 1).contiguous()
        x.cpu()
        x.sum(dim=1).tolist()  # one wait for the reduction, however many elements it reads

    kernels = record(fn)
    assert sum(k.syncs for k in kernels) == 3
    assert sum(k.layout_conversions for k in kernels) == 1


def test_custom_op_is_one_kernel_with_its_declared_cost():
    from mmfs_fast.ops import _backend, bias_act

    if not _backend.installed("cuda"):
        pytest.skip("the CUDA extension is not built here: its ops are not registered")

    def fn():
        x = torch.empty(2, 8, 4, 4, device="cuda", dtype=torch.float16)
        bias_act(x, torch.empty(8, device="cuda", dtype=torch.float16))

    (op,) = record(fn)
    assert op.op == "bias_act" and op.kernels == 1 and op.bytes == (2 * 2 * 8 * 16 + 8) * 2


def test_polyphase_upsampling_is_one_convolution_of_four_times_the_work_and_one_shuffle_pass():
    """Both forms of the Engine's upsampling convolution as counted: the polyphase form's
    convolution does 4× the transposed one's multiply-adds (four 3×3 phases per input pixel
    instead of one 3×3 scatter), and its interleave is one pass (phases read, output written);
    the transposed form leaves its blur to the epilogue (no pass of its own)."""
    from mmfs_fast.models.inference import _ModulatedConv
    from mmfs_fast.models.layers import ModulatedConv2d

    layer = ModulatedConv2d(16, 8, 3, 32, upsample=True).eval()
    counted, blurs = {}, {}
    with cm.fake_cuda() as recorder:
        for form, size in (("transposed", 17), ("polyphase", 16)):
            prepared = _ModulatedConv(layer, torch.float16, form).to("cuda")
            x = torch.empty(2, 16, 8, 8, device="cuda", dtype=torch.float16)
            with recorder.record() as kernels:
                out, blurs[form] = prepared(x)
            assert out.shape == (2, 8, size, size)
            counted[form] = kernels
    assert blurs["polyphase"] is None and blurs["transposed"].shape == (4, 4)
    convs = {form: max((k for k in ks if k.op == "convolution"), key=lambda k: k.flops) for form, ks in counted.items()}
    assert convs["transposed"].flops == 2 * (2 * 16 * 8 * 8) * 8 * 9  # per input pixel
    assert convs["polyphase"].flops == 4 * convs["transposed"].flops
    (shuffle,) = [k for k in counted["polyphase"] if k.op == "pixel_shuffle"]
    assert shuffle.kernels == 1 and shuffle.bytes == 2 * (2 * 8 * 16 * 16) * 2 and shuffle.layout_conversions == 0
    assert [k.op for k in counted["transposed"]] == ["convolution"] and len(counted["polyphase"]) == 2


def test_folded_downsampling_is_one_convolution_of_four_times_the_work_and_no_blur_pass():
    """Both forms of the encoder's downsampling convolution as counted: folded, the blur's pass
    goes and the stride-2 convolution's 6×6 kernel does 4× the 3×3 one's multiply-adds."""
    from mmfs_fast.models.inference import _conv_layer
    from mmfs_fast.models.layers import ConvLayer

    layer = ConvLayer(8, 16, 3, downsample=True)
    convs = {form: _conv_layer(layer, torch.float16, False, downsample_form=form)[0] for form in ("blurred", "folded")}
    counted = {}
    with cm.fake_cuda() as recorder:
        for form, conv in convs.items():
            prepared = conv.to("cuda")
            x = torch.empty(2, 8, 16, 16, device="cuda", dtype=torch.float16)
            with recorder.record() as kernels:
                assert prepared(x).shape == (2, 16, 8, 8)
            counted[form] = kernels
    assert [k.op for k in counted["blurred"]] == ["upfirdn2d", "convolution"]
    assert [k.op for k in counted["folded"]] == ["convolution"]
    assert counted["folded"][0].flops == 4 * counted["blurred"][1].flops == 4 * 2 * (2 * 16 * 8 * 8) * 8 * 9


def test_fused_stem_is_one_kernel_writing_the_output_once():
    """Both forms of the encoder's first convolution as counted: separate, the convolution writes
    the output and bias_act reads and writes it again; fused, stem_conv reads the image and writes
    the output once, with the convolution's multiply-adds on tensor cores."""
    from mmfs_fast.models.inference import _conv_layer
    from mmfs_fast.models.layers import ConvLayer
    from mmfs_fast.ops import _backend

    if not _backend.triton_installed():
        pytest.skip("triton is not installed: stem_conv has no kernel to count on CUDA")
    layer = ConvLayer(3, 16, 3)
    counted = {}
    with cm.fake_cuda() as recorder:
        for form in _backend.STEM_FORMS:
            prepared = _conv_layer(layer, torch.float16, False, stem_form=form).to(
                "cuda", memory_format=torch.channels_last)
            x = torch.empty(2, 3, 8, 8, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
            with recorder.record() as kernels:
                assert prepared(x).shape == (2, 16, 8, 8)
            counted[form] = kernels
    image, output = 2 * 3 * 64 * 2, 2 * 16 * 64 * 2
    assert [k.op for k in counted["separate"]] == ["convolution", "bias_act"]
    (fused,) = counted["fused"]
    assert fused.op.endswith("stem_conv") and fused.kernels == 1 and fused.tensor_cores
    # the image read and the output written once, the fp16 weight and fp32 bias read
    assert fused.bytes == image + output + 16 * 27 * 2 + 16 * 4
    assert fused.flops == counted["separate"][0].flops == 2 * (2 * 16 * 64) * 27
    assert counted["separate"][1].bytes == 2 * output + 16 * 2


def test_styled_epilogue_is_one_kernel_reading_x_and_writing_y():
    """The triton backend's op (the CUDA extension here lacks it), with one noise plane expanded
    over the batch as the Engine passes it: read once, not copied per sample."""
    from mmfs_fast.ops import _backend, styled_epilogue

    if not _backend.triton_installed():
        pytest.skip("triton is not installed: the op has no kernel to count on CUDA")

    def fn():
        x = torch.empty(2, 8, 4, 4, device="cuda", dtype=torch.float16)
        noise = torch.empty(1, 1, 4, 4, device="cuda", dtype=torch.float16).expand(2, 1, 4, 4)
        styled_epilogue(x, torch.empty(2, 8, device="cuda"), torch.empty(8, device="cuda"), noise, 0.5)

    (op,) = record(fn)
    assert op.op.endswith("styled_epilogue") and op.kernels == 1
    # x and y in fp16, the (B, C) demod and (C,) bias in fp32, one fp16 noise plane
    assert op.bytes == 2 * (2 * 8 * 16) * 2 + (2 * 8 + 8) * 4 + 16 * 2
    assert op.flops == 5 * 2 * 8 * 16


@pytest.mark.parametrize("with_unscaled", [False, True])
def test_blurred_styled_epilogue_is_one_kernel_reading_x_once(with_unscaled):
    """The decoder's form after a transposed convolution: the 4×4 FIR over a (2r + 1)² input with
    pad 1 and the next convolution's styles, in one kernel that reads x once and writes the (2r)² output
    (and the unscaled one for the ToRGB, when given)."""
    from mmfs_fast.ops import _backend, default_fir, styled_epilogue

    if not _backend.triton_installed():
        pytest.skip("triton is not installed: the op has no kernel to count on CUDA")

    def fn():
        x = torch.empty(2, 8, 9, 9, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        noise = torch.empty(1, 1, 8, 8, device="cuda", dtype=torch.float16).expand(2, 1, 8, 8)
        unscaled = torch.empty(2, 8, 8, 8, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        out = styled_epilogue(x, torch.empty(2, 8, device="cuda"), torch.empty(8, device="cuda"), noise, 0.5,
                              next_styles=torch.empty(2, 8, device="cuda"), blur=default_fir(device="cuda") * 4,
                              blur_pad=1, unscaled_out=unscaled if with_unscaled else None)
        assert out.shape == (2, 8, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)

    kernels = record(fn)
    (op,) = [k for k in kernels if k.op.endswith("styled_epilogue")]
    assert op.kernels == 1
    # x read and y (and the unscaled y) written in fp16; demod, bias, next_styles and the 16 taps in
    # fp32; one fp16 noise plane
    outputs = 2 if with_unscaled else 1
    assert op.bytes == (2 * 8 * 81 + outputs * 2 * 8 * 64) * 2 + (2 * 8 + 8 + 2 * 8 + 16) * 4 + 64 * 2
    assert op.flops == (2 * 16 + 3 + 2 + 1) * 2 * 8 * 64


def test_roofline_takes_the_slower_of_compute_and_memory():
    peak = cm.peaks.peak_for("H200")
    c = cm.Constants(memory_efficiency=0.5, compute_efficiency=0.25, cudnn_transposes=1.0)
    memory_bound = cm.Kernel("add", "x", bytes=4.8e9, flops=1e9)
    compute_bound = cm.Kernel("convolution", "x", bytes=1e6, flops=989.4e12, dtype="fp16", tensor_cores=True)
    assert cm.kernel_seconds(memory_bound, peak, c) == pytest.approx(4.8e9 / (4800e9 * 0.5))
    assert cm.kernel_seconds(compute_bound, peak, c) == pytest.approx(4.0)


def test_two_parallel_chains_share_the_gpu():
    """A region's chains (graph kernels only) share the GPU: the longer chain's time, gaps
    included, unless their kernels' own times add up to more; a kernel outside the region, or an
    eager one, adds its own."""
    peak = cm.peaks.peak_for("H200")
    c = cm.Constants(memory_efficiency=0.5, graph_gap_us=4.0, launch_us=6.0, call_us=0.0)
    gb_s, gap_s = 4.8e9 / (4800e9 * 0.5), 4e-6  # a pass over 4.8 GB, one graph gap

    def kernel(gb, **kw):
        return cm.Kernel("add", "x", bytes=gb * 4.8e9, graph=True, **kw)

    main = [kernel(1, region=1), kernel(1, region=1)]
    big_branch = [kernel(0.5, region=1, branch=True)] * 3
    got = cm.predict_seconds(main + big_branch + [kernel(1)], peak, c)
    assert got["graph_s"] == pytest.approx(3.5 * gb_s + gb_s + gap_s)  # the GPU's work, then the last kernel
    assert got["overlapped_s"] == pytest.approx(5 * gap_s)
    assert got["total_s"] == pytest.approx(got["graph_s"])
    small_branch = [kernel(1e-6, region=1, branch=True)] * 20  # gap-bound: 80 µs of gaps beside 4 ms
    got = cm.predict_seconds(main + small_branch, peak, c)
    assert got["graph_s"] == pytest.approx(2 * (gb_s + gap_s))
    gap_bound_main = [kernel(1e-6, region=1)] * 30
    got = cm.predict_seconds(gap_bound_main + small_branch, peak, c)
    assert got["graph_s"] == pytest.approx(30 * (1e-6 * gb_s + gap_s))  # the longer chain
    two_regions = main + big_branch + [dataclasses.replace(k, region=2) for k in main + big_branch]
    assert cm.predict_seconds(two_regions, peak, c)["graph_s"] == pytest.approx(2 * 3.5 * gb_s)
    eager_branch = [dataclasses.replace(k, graph=False) for k in big_branch]
    got = cm.predict_seconds(main + eager_branch, peak, c)
    assert got["overlapped_s"] == 0 and got["eager_s"] == pytest.approx(1.5 * gb_s)


# -- the gates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided():
    """Totals of the 512² guided stylization at batch 1 and 32 on the Engine's CUDA path."""
    with cm.fake_cuda() as recorder:
        models = cm.build_models(with_dino=False, with_clip=False)
        counted = {batch: cm.count(recorder, models, "guided_stylization", batch) for batch in GUIDED_BOUNDS}
    return {batch: dict(cm.totals(kernels), converting=[(k.op, k.layer) for k in kernels if k.layout_conversions],
                        eager=[(k.op, k.bytes) for k in kernels if not k.graph],
                        branch={k.layer for k in kernels if k.branch},
                        beside_branch={k.layer.split(".")[1] for k in kernels if k.region and not k.branch},
                        replayed_outside_modules=[k.op for k in kernels if k.graph and k.layer == "outside modules"])
            for batch, kernels in counted.items()}


@pytest.mark.parametrize("batch", sorted(GUIDED_BOUNDS))
def test_a_replay_copies_its_inputs_in_and_its_output_out_and_replays_the_rest(guided, batch):
    """Outside the graph: the faces' cast to fp16 channels-last, the copies into the graph's static
    inputs (fp16 faces, fp32 w+) and out of its fp32 output; inside it every op of the captured
    function, the output's clamp too, which runs in no module."""
    faces, w_plus, image = batch * 3 * 512 * 512 * 2, batch * 10 * 512 * 4, batch * 3 * 512 * 512 * 4
    assert guided[batch]["eager"] == [("_to_copy", 2 * faces + faces), ("copy_", 2 * faces), ("copy_", 2 * w_plus),
                                      ("clone", 2 * image)]
    assert guided[batch]["replayed_outside_modules"] == ["clamp"]


@pytest.mark.parametrize("batch", sorted(GUIDED_BOUNDS))
def test_guided_stylization_launches_no_more_kernels_and_moves_no_more_bytes(guided, batch):
    bound, got = GUIDED_BOUNDS[batch], guided[batch]
    assert got["kernels"] <= bound["kernels"], f"{got['kernels']} kernels > {bound['kernels']}: a pass was added"
    assert got["bytes"] / batch <= bound["bytes_per_image"], "more bytes per image: a pass or a copy was added"
    assert got["cudnn_transposes"] <= bound["cudnn_transposes"]
    # channels_last end to end: the one layout change is the caller's NCHW faces, in the cast to
    # fp16 that copies them anyway
    assert got["converting"] == [("_to_copy", "outside modules")], "an explicit layout copy on the Engine's path"
    # the convolutions' work: SPEC's model (172 GFLOP), plus the 4× kernels of the downsampling
    # convolutions that winners.json folds (the 512² and 256² ResBlocks': 3 × 7.2 GFLOP more, less their blurs)
    assert got["flops"] / batch == pytest.approx(192.5e9, rel=0.01)


@pytest.mark.parametrize("batch", sorted(GUIDED_BOUNDS))
def test_the_styles_run_beside_the_encoder(guided, batch):
    """The style table (its kernels depend on w+ only) is the graph's second branch, the encoder
    the first; the decoder, which reads both, runs after the join."""
    assert guided[batch]["branch"] == {"model.synthesis.table"}
    assert guided[batch]["beside_branch"] == {"encoder"}


def test_a_sampled_style_runs_beside_the_encoder():
    with cm.fake_cuda() as recorder:
        models = cm.build_models(with_dino=False, with_clip=False)
        kernels = cm.count(recorder, models, "random_sampling", 1)
    assert {k.layer.split(".")[1] for k in kernels if k.branch} == {"mapping_z", "synthesis"}
    assert {k.layer.split(".")[1] for k in kernels if k.region and not k.branch} == {"encoder"}


@pytest.mark.parametrize("batch", sorted(GUIDED_BOUNDS))
def test_guided_stylization_never_waits_for_the_device(guided, batch):
    assert guided[batch]["syncs"] == 0


def test_styles_launch_no_more_kernels_and_copy_no_layout():
    with cm.fake_cuda() as recorder:
        models = cm.build_models(with_dino=False)
        counted = {workload: cm.count(recorder, models, workload, 1) for workload in STYLE_BOUNDS}
    for workload, kernels in counted.items():
        got = cm.totals(kernels)
        assert got["kernels"] <= STYLE_BOUNDS[workload], f"{workload}: {got['kernels']} kernels: a pass was added"
        assert got["layout_conversions"] == got["cudnn_transposes"] == got["syncs"] == 0, workload
