"""Per-op benchmarks: upfirdn2d and bias_act at the exact calls the Stylizer and the
Discriminator make (bench/op_shapes.py), add_layer_norm at the style path's rows, for each
installed impl, torch.compile of ``ref`` (not add_layer_norm's), each dtype, forward and
forward+backward. Being memory-bound, they report GB/s of the ideal
traffic (each input read once, each output written once). extra_info.uses says how often
each model makes the call. (modulated_conv2d has no backend to choose: the Engine's
``mmfs-fast-fused`` configuration of test_bench_e2e.py times it.)

test_upsample_form times the Engine's upsampling StyledConv in both of its forms (transposed
conv with the blur in the epilogue, polyphase) at each decoder shape of the modulated
convolutions, test_downsample_form the encoder's downsampling ConvLayer in both of its forms
(blur + strided conv, the blur folded into the strided kernel), in TFLOP/s of the training
form's convolution, test_stem_form the encoder's first ConvLayer in both of its forms
(convolution + bias_act, the stem_conv op), in GB/s; on a GPU their cases rewrite the
"upsample", "downsample" and "stem" entries of winners.json (bench/winners.py).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from harness import DEVICE, DTYPE_NAMES, OP_ROUNDS, ON_GPU, PROFILE, record_rate
from mmfs_fast import benchmark as mb
from mmfs_fast import ops
from mmfs_fast.models import Stylizer
from mmfs_fast.models.inference import _conv_layer, _StyledConv
from mmfs_fast.models.layers import Blur, ConvLayer, StyledConv
from mmfs_fast.ops import _backend
from op_shapes import PUBLIC_OPS, OpCall, op_calls

OP_BATCHES = (PROFILE.batches[0], PROFILE.batches[-1])
CALLS = op_calls(PROFILE.stylizer, PROFILE.stylizer.size, PROFILE.stylizer.ngf, OP_BATCHES)
GPU_IMPLS = ("cuda", "triton")
TIMED_OPS = tuple(op for op in PUBLIC_OPS if op in ops.backends())  # the ops with a backend to choose
# torch.compile takes seconds per shape, dtype and direction, so it runs on the
# heaviest call of each op and batch size only: enough to place it beside the rest.
# On the CPU one op keeps the path alive (compiling there takes minutes).
COMPILED_PER_OP_AND_BATCH = 1
COMPILED_OPS = TIMED_OPS if ON_GPU else ("upfirdn2d",)


def ideal_bytes(call: OpCall, x: torch.Tensor, out: torch.Tensor, backward: bool) -> float:
    """Forward reads x, writes out; backward reads grad_out, writes grad_x, and bias_act
    also re-reads x for the activation's slope."""
    traffic = x.numel() + out.numel()
    if backward:
        traffic += out.numel() + x.numel() + (x.numel() if call.op == "bias_act" else 0)
    return traffic * x.element_size()


def _work(call: OpCall) -> int:
    """Size of the call, for picking the heaviest: elements of x."""
    return math.prod(dict(call.shapes)["x"])


def _cases() -> list:
    heaviest: dict[tuple[str, int], list[OpCall]] = {}
    for call, _ in CALLS:
        if call.op in COMPILED_OPS and (ON_GPU or call.batch == OP_BATCHES[0]):
            heaviest.setdefault((call.op, call.batch), []).append(call)
    compiled = {c for calls in heaviest.values()
                for c in sorted(calls, key=_work, reverse=True)[:COMPILED_PER_OP_AND_BATCH]}
    impls = ["ref"] + (list(GPU_IMPLS) if ON_GPU else [])
    cases = []
    for call, uses in CALLS:
        if call.op not in TIMED_OPS:
            continue
        for impl in impls + (["compile"] if call in compiled else []):
            cases.append(pytest.param(call, uses, impl, id=f"{call.op}-{call.label}-{impl}"))
    return cases


def _op_function(op: str, impl: str):
    fn = PUBLIC_OPS[op]
    if impl == "compile":
        return torch.compile(functools.partial(fn, impl="ref"))
    return functools.partial(fn, impl=impl)


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("call,uses,impl", _cases())
def test_op(call: OpCall, uses: dict, impl: str, dtype: str, direction: str, measure, benchmark):
    if impl in GPU_IMPLS and impl not in ops.backends()[call.op]:
        pytest.skip(f"{call.op}: impl {impl!r} is not installed here (ops.backends() = {ops.backends()[call.op]})")
    backward = direction == "fwdbwd"
    args = call.make_args(DEVICE, mb.DTYPES[dtype], requires_grad=backward)
    with torch.no_grad():  # through ref, so a compiled op's first call is measured by measure()
        out = PUBLIC_OPS[call.op](**args, impl="ref")
    op = _op_function(call.op, impl)
    if backward:
        inputs = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_out = torch.randn_like(out)

        def fn():
            torch.autograd.grad(op(**args), inputs, grad_out)
    else:
        fn = torch.no_grad()(lambda: op(**args))
    seconds = measure(fn, group=f"{call.op} {call.label} {dtype} {direction}", rounds=OP_ROUNDS, op=call.op, impl=impl, dtype=dtype,
                      direction=direction, batch=call.batch, shape=call.label, uses=uses)
    record_rate(benchmark, seconds, dtype, bytes_moved=ideal_bytes(call, args["x"], out, backward))


# (tokens, width) of the residual add + LayerNorm pairs of the style path: CLIP's text tower,
# its image tower and the clip_mapper
ADD_LAYER_NORM_ROWS = {"text": (77, 512), "image": (50, 768), "mapper": (10, 512)}


def style_op_cases(shapes: dict):
    """A style-path op's cases: each place of ``shapes``, batch, impl, dtype and direction."""
    def parametrized(test):
        for name, values in (("where", sorted(shapes)), ("batch", OP_BATCHES),
                             ("impl", ["ref", *GPU_IMPLS] if ON_GPU else ["ref"]), ("dtype", DTYPE_NAMES),
                             ("direction", ["fwd", "fwdbwd"])):
            test = pytest.mark.parametrize(name, values)(test)
        return test
    return parametrized


@style_op_cases(ADD_LAYER_NORM_ROWS)
def test_add_layer_norm(where: str, batch: int, impl: str, dtype: str, direction: str, measure, benchmark):
    """add_layer_norm at CLIP's and the mapper's rows; on a GPU its cases rewrite the op's
    backend order in winners.json (bench/winners.py)."""
    if impl not in ops.backends()["add_layer_norm"]:
        pytest.skip(f"add_layer_norm: impl {impl!r} is not installed here or has no kernel for it")
    backward = direction == "fwdbwd"
    tokens, width = ADD_LAYER_NORM_ROWS[where]
    inputs = [torch.randn(batch, tokens, width, device=DEVICE, dtype=mb.DTYPES[dtype], requires_grad=backward)
              for _ in range(2)]
    weight, bias = (torch.randn(width, device=DEVICE, dtype=mb.DTYPES[dtype]) for _ in range(2))
    op = functools.partial(ops.add_layer_norm, weight=weight, bias=bias, impl=impl)
    if backward:
        grads = [torch.randn_like(inputs[0]) for _ in range(2)]

        def fn():
            torch.autograd.grad(op(*inputs), inputs, grads)
    else:
        fn = torch.no_grad()(lambda: op(*inputs))
    label = f"{where} {batch}x{tokens}x{width}"
    seconds = measure(fn, group=f"add_layer_norm {label} {dtype} {direction}", rounds=OP_ROUNDS, op="add_layer_norm",
                      impl=impl, dtype=dtype, direction=direction, batch=batch, shape=label)
    # two rows read, two written; the backward reads two gradients and the sum, writes two
    passes = 4 + (5 if backward else 0)
    record_rate(benchmark, seconds, dtype, bytes_moved=passes * inputs[0].numel() * inputs[0].element_size())


# (tokens, width, outputs) of CLIP's c_fc, the GEMM whose epilogue is the SiLU: the text tower, the image tower
LINEAR_SILU_SHAPES = {"text": (77, 512, 2048), "image": (50, 768, 3072)}


@style_op_cases(LINEAR_SILU_SHAPES)
def test_linear_silu(where: str, batch: int, impl: str, dtype: str, direction: str, measure, benchmark):
    """linear_silu at CLIP's c_fc (ref: cuBLAS's GEMM, then a SiLU pass); on a GPU its cases
    rewrite the op's backend order in winners.json (bench/winners.py)."""
    if impl not in ops.backends()["linear_silu"]:
        pytest.skip(f"linear_silu: impl {impl!r} is not installed here or has no kernel for it")
    backward = direction == "fwdbwd"
    tokens, width, outs = LINEAR_SILU_SHAPES[where]
    dt = mb.DTYPES[dtype]
    x = torch.randn(batch * tokens, width, device=DEVICE, dtype=dt, requires_grad=backward)
    weight = (torch.randn(outs, width, device=DEVICE) / width ** 0.5).to(dt)
    bias = torch.randn(outs, device=DEVICE, dtype=dt)
    op = functools.partial(ops.linear_silu, weight=weight, bias=bias, alpha=1.702, impl=impl)
    if backward:
        grad = torch.randn(batch * tokens, outs, device=DEVICE, dtype=dt)

        def fn():
            torch.autograd.grad(op(x), x, grad)
    else:
        fn = torch.no_grad()(lambda: op(x))
    label = f"{where} {batch * tokens}x{width}x{outs}"
    seconds = measure(fn, group=f"linear_silu {label} {dtype} {direction}", rounds=OP_ROUNDS, op="linear_silu",
                      impl=impl, dtype=dtype, direction=direction, batch=batch, shape=label)
    # x, the weight and the output once each (the backward: the gradient, x, the weight read, dx written)
    size = x.element_size()
    passes = (x.numel() + weight.numel() + x.shape[0] * outs) * (2 if backward else 1)
    record_rate(benchmark, seconds, dtype, bytes_moved=passes * size)


UPSAMPLE_CALLS = [call for call, _ in CALLS if call.op == "modulated_conv2d" and dict(call.options)["up"] == 2]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("form", _backend.UPSAMPLE_FORMS)
@pytest.mark.parametrize("call", UPSAMPLE_CALLS, ids=lambda call: call.label)
def test_upsample_form(call: OpCall, form: str, dtype: str, measure, benchmark):
    """One upsampling StyledConv of the Engine's decoder (convolution and epilogue, on an input
    already scaled by its styles) in ``form``, from a random-init layer of the benchmarked
    Stylizer's size."""
    b, i, h, _ = dict(call.shapes)["x"]
    o, _, k, _ = dict(call.shapes)["weight"]
    layer = StyledConv(i, o, k, PROFILE.stylizer.style_dim, upsample=True).eval()
    prepared = _StyledConv(layer, mb.DTYPES[dtype], upsample_form=form).to(DEVICE)
    x = torch.randn(b, i, h, h, device=DEVICE, dtype=mb.DTYPES[dtype]).contiguous(memory_format=torch.channels_last)
    demod = torch.rand(b, o, device=DEVICE)
    fn = torch.no_grad()(lambda: prepared(x, demod, None))
    seconds = measure(fn, group=f"upsample {call.label} {dtype}", rounds=OP_ROUNDS, op="upsample", impl=form,
                      dtype=dtype, direction="fwd", batch=b, shape=_backend.shape_key(i, o, h))
    record_rate(benchmark, seconds, dtype, flops=2.0 * b * o * i * k * k * h * h)


@functools.cache
def downsample_shapes() -> list[tuple[int, int, int, int]]:
    """(batch, in channels, out channels, input height) of each 3×3 downsampling convolution of
    the benchmarked encoder, read off a forward on the meta device."""
    shapes = []
    with torch.device("meta"), torch.no_grad():
        stylizer = Stylizer(PROFILE.stylizer).eval()
        for m in stylizer.encoder.modules():
            if isinstance(m, ConvLayer) and isinstance(m[0], Blur) and m[1].weight.shape[-1] == 3:
                m.register_forward_pre_hook(lambda m, args: shapes.append(
                    (args[0].shape[1], m[1].weight.shape[0], args[0].shape[2])))
        stylizer.encode(torch.empty(1, 3, stylizer.config.size, stylizer.config.size))
    return [(b, *shape) for b in OP_BATCHES for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("form", _backend.DOWNSAMPLE_FORMS)
@pytest.mark.parametrize("shape", downsample_shapes(), ids=lambda s: f"b{s[0]}-{_backend.shape_key(*s[1:])}")
def test_downsample_form(shape: tuple[int, int, int, int], form: str, dtype: str, measure, benchmark):
    """One downsampling ConvLayer of the Engine's encoder (blur and strided convolution, then
    bias_act, the CUDA form) in ``form``, from a random-init layer."""
    b, i, o, h = shape
    layer = ConvLayer(i, o, 3, downsample=True)
    prepared = _conv_layer(layer, mb.DTYPES[dtype], conv_adds_bias=False, downsample_form=form).to(DEVICE)
    x = torch.randn(b, i, h, h, device=DEVICE, dtype=mb.DTYPES[dtype]).contiguous(memory_format=torch.channels_last)
    fn = torch.no_grad()(lambda: prepared(x))
    seconds = measure(fn, group=f"downsample {_backend.shape_key(i, o, h)} b{b} {dtype}", rounds=OP_ROUNDS,
                      op="downsample", impl=form, dtype=dtype, direction="fwd", batch=b,
                      shape=_backend.shape_key(i, o, h))
    record_rate(benchmark, seconds, dtype, flops=2.0 * b * o * i * 9 * (h // 2) ** 2)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("form", _backend.STEM_FORMS)
@pytest.mark.parametrize("batch", OP_BATCHES)
def test_stem_form(batch: int, form: str, dtype: str, measure, benchmark):
    """The encoder's first ConvLayer (on the RGB face, as the Engine runs it on CUDA: channels-last)
    in ``form``: the convolution and bias_act, or the stem_conv op in one pass; GB/s of its ideal
    traffic (the face read, the output written once)."""
    stem = Stylizer(PROFILE.stylizer).encoder[0]
    size = PROFILE.stylizer.size
    prepared = _conv_layer(stem, mb.DTYPES[dtype], conv_adds_bias=False, stem_form=form).to(
        DEVICE, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=DEVICE, dtype=mb.DTYPES[dtype]).contiguous(
        memory_format=torch.channels_last)
    out_ch = prepared.separate[0].weight.shape[0]
    key = _backend.shape_key(3, out_ch, size)
    fn = torch.no_grad()(lambda: prepared(x))
    seconds = measure(fn, group=f"stem {key} b{batch} {dtype}", rounds=OP_ROUNDS, op="stem", impl=form,
                      dtype=dtype, direction="fwd", batch=batch, shape=key)
    record_rate(benchmark, seconds, dtype, bytes_moved=(3 + out_ch) * batch * size * size * x.element_size())
