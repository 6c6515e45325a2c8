"""The cuda backend (csrc/, mmfs_fast._C).

Without a GPU: the extension imports, its ops are registered with fake kernels and
autograd, opcheck passes on meta tensors, torch.compile traces them. With a GPU
(``gpu`` marker): every op against ref in fp32 (tight) and fp16/bf16 (the flash-attention
rule: cuda's error at most twice ref's own low-precision error, both against fp32 ref),
forward and gradients, gradgradcheck of bias_act, odd sizes, batch 1 and 33,
channels_last, CUDA-graph capture and opcheck.
"""
import importlib
import math

import pytest
import torch

from mmfs_fast.ops import _backend, _cuda, bias_act, default_fir, modulated_conv2d, upfirdn2d
from mmfs_fast.ops._torch_target import TORCH_TARGET

pytestmark = pytest.mark.skipif(_backend.cuda_extension() is None,
                                reason="mmfs_fast._C is not built (no nvcc or CPU-only torch at install time)")
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
OPS = ("upfirdn2d", "bias_act", "bias_act_grad")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rand(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# Each case: the public op, its keyword arguments, the tensors it differentiates (name -> shape).
def upfirdn2d_case(up, down, pad, kernel_shape=(4, 4), size=(9, 7), batch=2, channels=3):
    def run(tensors, impl):
        return upfirdn2d(tensors["x"], tensors["kernel"], up=up, down=down, pad=pad, impl=impl)
    return run, {"x": (batch, channels, *size)}, {"kernel": kernel_shape}


def bias_act_case(act, clamp=None, shape=(3, 5, 6, 7)):
    def run(tensors, impl):
        return bias_act(tensors["x"], tensors["bias"], act=act, clamp=clamp, impl=impl)
    return run, {"x": shape, "bias": (shape[1],)}, {}


CASES = {
    "fir_up2": upfirdn2d_case(2, 1, (2, 1)),
    "fir_blur11": upfirdn2d_case(1, 1, (1, 1)),
    "fir_blur22": upfirdn2d_case(1, 1, (2, 2)),
    "fir_down2": upfirdn2d_case(1, 2, (1, 1)),
    "fir_generic": upfirdn2d_case(3, 2, (2, -1, 0, 3), kernel_shape=(5, 3)),
    "fir_crop": upfirdn2d_case(1, 1, (-1, 2, 3, -2), size=(40, 37)),
    "fir_batch33": upfirdn2d_case(2, 1, (2, 1), batch=33, size=(35, 33)),
    "bias_lrelu": bias_act_case("lrelu"),
    "bias_relu_clamp": bias_act_case("relu", clamp=0.5),
    "bias_linear": bias_act_case("linear", shape=(33, 7)),
}


def make_tensors(shapes, constants, device, dtype, channels_last=False, seed=0):
    tensors = {name: rand(*shape, device=device, dtype=dtype, seed=seed + n)
               for n, (name, shape) in enumerate(shapes.items())}
    if channels_last and tensors["x"].ndim == 4:
        tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    tensors.update({name: rand(*shape, device=device, seed=99).abs() for name, shape in constants.items()})
    return tensors


# ---------------------------------------------------------------- without a GPU


def test_extension_reports_its_build():
    info = _backend.cuda_extension().build_info()
    assert set(info) == {"arch_list", "nvcc_flags", "cxx_flags", "cuda_version", "torch_version", "torch_target"}
    assert info["arch_list"] and "-O3" in info["nvcc_flags"]
    assert info["torch_target"] == ".".join(map(str, TORCH_TARGET))


@pytest.mark.parametrize("op", OPS)
def test_ops_registered_with_fake_kernels_and_autograd(op):
    from torch._library.simple_registry import singleton

    qualname = f"mmfs_fast::{op}"
    assert hasattr(torch.ops.mmfs_fast, op)
    entry = singleton.find(qualname)
    assert entry.fake_impl.kernel is not None, f"{qualname} has no fake kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def test_auto_picks_cuda_only_for_cuda_tensors():
    module = importlib.import_module("mmfs_fast.ops.upfirdn2d")  # the package attribute is the function
    assert _backend.resolve("upfirdn2d", "auto", module.IMPLEMENTATIONS, torch.zeros(1)) == "ref"
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        assert _backend.resolve("upfirdn2d", "auto", module.IMPLEMENTATIONS, x) == "cuda"
        assert _backend.resolve("upfirdn2d", "auto", module.IMPLEMENTATIONS, x.double()) == "ref"


def test_auto_order_is_per_op(monkeypatch, recwarn):
    """An op measured fastest on ref takes it without the slow-fallback warning; the other ops
    keep their own order, the CUDA kernel first."""
    monkeypatch.setattr(_backend, "can_run", lambda impl, x: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setitem(_backend.FASTEST_FIRST_PER_OP, "upfirdn2d", ("ref", "cuda", "triton"))
    x = torch.zeros(1)
    assert _backend.available("upfirdn2d", _backend.IMPLS, x) == ["ref", "cuda", "triton"]
    assert _backend.available("bias_act", _backend.IMPLS, x) == ["cuda", "triton", "ref"]
    assert _backend.resolve("upfirdn2d", "auto", _backend.IMPLS, x) == "ref"
    assert not [w for w in recwarn if "falls back" in str(w.message)]


def op_samples(device="meta"):
    """(op name, arguments) pairs; names, so that collecting them needs no built extension."""
    fir = torch.rand(4, 4, device=device)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    x_cl = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, device=device, requires_grad=True)
    return [
        ("upfirdn2d", (x, fir, 2, 1, [2, 1, 2, 1])),
        ("upfirdn2d", (x_cl, fir, 1, 2, [1, 1, 1, 1])),
        ("bias_act", (x, bias, 0.2, math.sqrt(2), None, 1)),
        ("bias_act", (x_cl, None, 0.0, 1.0, 256.0, 1)),
        ("bias_act_grad", (torch.randn(2, 3, 8, 8, device=device), x, bias, 0.2, 1.0, 0.5, 1)),
    ]


@pytest.mark.parametrize("sample", range(len(op_samples())))
def test_cuda_kernels_are_reached_through_the_stable_abi(sample):
    """Without a GPU: each op's registered CUDA kernel, called on CPU tensors, unboxes its
    arguments through the stable ABI and raises its own check as a RuntimeError naming the op."""
    name, args = op_samples("cpu")[sample]
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=rf"mmfs_fast::{name}: \w+ must be a CUDA tensor, got one on cpu"):
        getattr(torch.ops.mmfs_fast, name).default.redispatch(cuda_only, *args)


@pytest.mark.parametrize("sample", range(len(op_samples())))
def test_fake_kernels_match_shapes(sample):
    name, args = op_samples()[sample]
    op = getattr(torch.ops.mmfs_fast, name)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = op(*args)
    expected_shape = {0: (2, 3, 16, 16), 1: (2, 3, 4, 4)}.get(sample, (2, 3, 8, 8))
    assert tuple(out.shape) == expected_shape
    assert out.is_contiguous(memory_format=torch.channels_last) == args[0].is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("sample", range(len(op_samples())))
def test_opcheck_on_meta(sample):
    name, args = op_samples()[sample]
    op = getattr(torch.ops.mmfs_fast, name)
    # Meta tensors carry no values: the fake-kernel and schema tests apply, not those that compare numbers.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def small_generator_block(x, weight, styles, bias, rgb_weight, fir):
    """StyledConv(up) -> FusedLeakyReLU -> ToRGB -> Upsample: the modulated convolutions through
    their op (plain torch), the rest through the cuda backend's functions."""
    out = modulated_conv2d(x, weight, styles[:, :x.shape[1]], up=2, fir=fir)
    out = _cuda.bias_act(out, bias, "lrelu", 0.2, math.sqrt(2), None, 1)
    rgb = modulated_conv2d(out, rgb_weight, styles, demodulate=False, fir=fir)
    return _cuda.upfirdn2d(rgb, fir * 4, 2, 1, (2, 1, 2, 1))


def test_compile_traces_the_ops_on_meta():
    """torch.compile(fullgraph=True) traces through the ops (forward and backward) without running them."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module

    compiled = torch.compile(small_generator_block, backend=record, fullgraph=True)
    args = [torch.randn(*shape, device="meta", requires_grad=True)
            for shape in ((2, 4, 8, 8), (5, 4, 3, 3), (2, 5), (5,), (3, 5, 1, 1))]
    out = compiled(*args, default_fir("meta"))
    assert out.shape == (2, 3, 32, 32) and out.device.type == "meta"
    assert all(f"mmfs_fast.{op}" in graphs[0] for op in ("upfirdn2d", "bias_act"))
    out.sum().backward()
    assert all(a.grad is not None and a.grad.shape == a.shape for a in args)


# ---------------------------------------------------------------- on a GPU


@pytest.fixture
def no_tf32():
    """ref's convolutions and the cuda backward's cuDNN calls in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def forward_and_grads(case, impl, dtype, channels_last=False):
    """The output and the gradients of <output, fixed random upstream> for the differentiable tensors."""
    run, shapes, constants = CASES[case]
    tensors = make_tensors(shapes, constants, "cuda", dtype, channels_last)
    inputs = [tensors[name].requires_grad_() for name in shapes]
    out = run(tensors, impl)
    upstream = rand(*out.shape, device="cuda", dtype=dtype, seed=7)
    return [out, *torch.autograd.grad(out, inputs, upstream)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_matches_ref(case, channels_last):
    truth = forward_and_grads(case, "ref", torch.float64, channels_last)
    cuda = forward_and_grads(case, "cuda", torch.float32, channels_last)
    for n, (got, want) in enumerate(zip(cuda, truth)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"tensor {n} (0: output, then gradients): {m}")
    if channels_last and cuda[0].ndim == 4:
        assert cuda[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_low_precision_within_twice_ref_error(case, dtype):
    truth = forward_and_grads(case, "ref", torch.float64)
    ref = forward_and_grads(case, "ref", dtype)
    cuda = forward_and_grads(case, "cuda", dtype)
    for n, (got, base, want) in enumerate(zip(cuda, ref, truth)):
        assert got.dtype == dtype
        floor = torch.finfo(dtype).eps * want.abs().max().item()
        cuda_error = (got.double() - want).abs().max().item()
        ref_error = (base.double() - want).abs().max().item()
        assert cuda_error <= 2 * ref_error + floor, f"tensor {n}: cuda error {cuda_error:.3g}, ref error {ref_error:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("clamp", [None, 0.7])
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
def test_bias_act_gradgradcheck_float64(act, clamp):
    x = rand(3, 4, 5, device="cuda", dtype=torch.float64).requires_grad_()
    bias = rand(4, device="cuda", dtype=torch.float64, seed=1).requires_grad_()

    def op(x, bias):
        return bias_act(x, bias, act=act, clamp=clamp, impl="cuda")

    assert torch.autograd.gradcheck(op, (x, bias))
    assert torch.autograd.gradgradcheck(op, (x, bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (3, 2, (2, -1, 0, 3))])
def test_upfirdn2d_gradgradcheck_float64(up, down, pad):
    x = rand(1, 2, 6, 5, device="cuda", dtype=torch.float64).requires_grad_()
    kernel = rand(4, 3, device="cuda", dtype=torch.float64, seed=1)

    def op(x):
        return upfirdn2d(x, kernel, up=up, down=down, pad=pad, impl="cuda")

    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_capture_and_replay(case):
    run, shapes, constants = CASES[case]
    static = make_tensors(shapes, constants, "cuda", torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
        run(static, "cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(static, "cuda")
    for name, value in make_tensors(shapes, constants, "cuda", torch.float16, seed=50).items():
        static[name].copy_(value)
    graph.replay()
    torch.testing.assert_close(captured, run(static, "cuda"), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sample", range(len(op_samples())))
def test_opcheck_on_gpu(sample):
    name, args = op_samples("cuda")[sample]
    op = getattr(torch.ops.mmfs_fast, name)
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
def test_compiled_block_matches_eager_on_gpu():
    args = [rand(*shape, device="cuda", seed=n)
            for n, shape in enumerate(((2, 4, 8, 8), (5, 4, 3, 3), (2, 5), (5,), (3, 5, 1, 1)))]
    compiled = torch.compile(small_generator_block, fullgraph=True)
    fir = default_fir("cuda")
    torch.testing.assert_close(compiled(*args, fir), small_generator_block(*args, fir))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
def test_whole_stylizer_cuda_matches_ref():
    from mmfs_fast.models import Stylizer, set_impl

    torch.manual_seed(0)
    model = Stylizer(size=32, ngf=4, style_dim=16, n_mlp=2).cuda().eval()
    x = rand(2, 3, 32, 32, device="cuda").clamp(-1, 1)
    z = rand(2, 16, device="cuda", seed=1)
    outputs = {}
    for impl in ("ref", "cuda"):
        set_impl(model, impl)
        with torch.no_grad():
            outputs[impl] = model(x, z=z, noise="zero")
    torch.testing.assert_close(outputs["cuda"], outputs["ref"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["ref", "cuda"])
def test_plain_stylizer_decode_replays_from_a_cuda_graph(impl):
    """The plain model, not only the Engine, is capturable: no host→device copy per call
    (modulated_conv2d without an explicit FIR once made one from host values)."""
    from mmfs_fast.models import Stylizer

    torch.manual_seed(0)
    model = Stylizer(size=32, ngf=4, style_dim=16, n_mlp=2, impl=impl).cuda().eval()
    feat = rand(2, model.decoder0.conv.weight.shape[2], 2, 2, device="cuda")
    w_plus = rand(2, 10, 16, device="cuda", seed=1)
    with torch.no_grad():
        expected = model.decode(feat, w_plus, noise="zero")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.decode(feat, w_plus, noise="zero")
        graph.replay()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- styled_epilogue (inference only)

STYLED_EPILOGUE = importlib.import_module("mmfs_fast.ops.styled_epilogue")  # the package attribute is the function
needs_styled_epilogue = pytest.mark.skipif(not _cuda.defines("styled_epilogue"),
                                           reason="mmfs_fast._C was built before styled_epilogue: rebuild it")


def test_styled_epilogue_is_a_cuda_backend_exactly_when_the_extension_defines_it():
    """An extension built before the op still loads: its cuda backend lacks just this op, and says so."""
    from mmfs_fast.ops import cuda_extension_report

    defined = hasattr(torch.ops.mmfs_fast, "styled_epilogue")
    assert _cuda.defines("styled_epilogue") == defined
    assert ("cuda" in STYLED_EPILOGUE.IMPLEMENTATIONS) == defined
    assert cuda_extension_report()["cuda_kernels"]["styled_epilogue"] == defined
    if defined:
        from torch._library.simple_registry import singleton

        assert singleton.find("mmfs_fast::styled_epilogue").fake_impl.kernel is not None
    else:
        with pytest.raises(RuntimeError, match="styled_epilogue has no 'cuda' implementation"):
            STYLED_EPILOGUE.styled_epilogue(rand(1, 2, 3, 3), rand(1, 2), rand(2), impl="cuda")


# (blur, blur_pad, next_styles): the decoder's FIR ×4 after a transposed convolution (2r + 1 →
# 2r with pad 1), and an asymmetric one with a wider pad, where a wrong flip or border shows
EPILOGUE_FORMS = {
    "plain": (None, 0, False),
    "next styles": (None, 0, True),
    "decoder blur": (default_fir() * 4, 1, True),
    "asymmetric blur": (rand(3, 4, seed=5), 2, False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_styled_epilogue
@pytest.mark.parametrize("dtype", (torch.float32,) + LOW_PRECISION)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("noise_batch", [None, 1, 33])
@pytest.mark.parametrize("form", EPILOGUE_FORMS.values(), ids=EPILOGUE_FORMS.keys())
def test_styled_epilogue_matches_ref_on_gpu(dtype, channels_last, noise_batch, form):
    blur, blur_pad, with_next = form
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, demod, bias = rand(33, 5, 9, 7), rand(33, 5, seed=1).abs() + 0.1, rand(5, seed=2)
    next_styles = rand(33, 5, seed=4).cuda() if with_next else None
    out_size = (9, 7) if blur is None else (9 + 2 * blur_pad - blur.shape[0] + 1, 7 + 2 * blur_pad - blur.shape[1] + 1)
    noise = None if noise_batch is None else rand(noise_batch, 1, *out_size, seed=3)

    def run(impl, dt):
        """The result and, with next_styles, unscaled_out (NaN until written)."""
        unscaled = None
        if with_next:
            unscaled = torch.full((33, 5, *out_size), math.nan, device="cuda", dtype=dt)
            unscaled = unscaled.contiguous(memory_format=layout)
        out = STYLED_EPILOGUE.styled_epilogue(x.to("cuda", dt).contiguous(memory_format=layout), demod.cuda(),
                                              bias.cuda(), None if noise is None else noise.to("cuda", dt), 0.7,
                                              next_styles=next_styles, blur=None if blur is None else blur.cuda(),
                                              blur_pad=blur_pad, unscaled_out=unscaled, impl=impl)
        assert out.dtype == dt and out.shape == (33, 5, *out_size) and out.is_contiguous(memory_format=layout)
        return [t.float() for t in (out, unscaled) if t is not None]

    for exact, low, got in zip(run("ref", torch.float32), run("ref", dtype), run("cuda", dtype)):
        bound = 1e-5 * exact.abs().max().item() if dtype == torch.float32 else \
            2 * (low - exact).abs().max().item() + 1e-5
        assert (got - exact).abs().max().item() <= bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_styled_epilogue
@pytest.mark.parametrize("bad,message", [  # bad: the arguments that replace good ones
    (lambda: dict(next_styles=None), "unscaled_out is given without next_styles (it would equal the result)"),
    (lambda: dict(unscaled_out=torch.empty(2, 3, 4, 5, device="cuda")),
     "unscaled_out must have the result's shape [2, 3, 4, 4], got [2, 3, 4, 5]"),
    (lambda: dict(unscaled_out=torch.empty(2, 3, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)),
     "unscaled_out must be dense in the result's layout (contiguous), got strides [48, 1, 12, 3]"),
    (lambda: dict(unscaled_out=torch.empty(2, 3, 4, 4, device="cuda", dtype=torch.float16)),
     "unscaled_out must have x's dtype Float, got Half"),
    (lambda: dict(unscaled_out=torch.empty(2, 3, 4, 4)), "unscaled_out must be a CUDA tensor, got one on cpu"),
])
def test_styled_epilogue_unscaled_out_checks_name_the_problem_on_gpu(bad, message):
    """The op itself, past the public function's checks."""
    args = dict(x=rand(2, 3, 4, 4), demod=rand(2, 3, seed=1), bias=rand(3, seed=2), noise=None, noise_strength=0.0,
                slope=0.2, next_styles=rand(2, 3, seed=4), blur=None, blur_pad=0, unscaled_out=torch.empty(2, 3, 4, 4))
    args = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in args.items()} | bad()
    with pytest.raises(RuntimeError) as error:
        torch.ops.mmfs_fast.styled_epilogue(*args.values())
    assert "mmfs_fast::styled_epilogue: " + message in str(error.value)


def styled_epilogue_samples(device="meta"):
    """Arguments of the op, each form of its inputs, alternately in either layout (the outputs'
    too); the blurred ones 9×9 → 8×8."""
    x = torch.randn(2, 3, 9, 9, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    demod, bias = torch.randn(2, 3, device=device), torch.randn(3, device=device)
    next_styles, fir = torch.randn(2, 3, device=device), torch.rand(4, 4, device=device)
    unscaled, unscaled_cl = torch.empty(2, 3, 8, 8, device=device), torch.empty(2, 3, 9, 9, device=device)
    return [
        (x, demod, bias, None, 0.0, 0.2, None, None, 0, None),
        (x_cl, demod, bias, torch.randn(2, 1, 9, 9, device=device), 0.5, 0.2, next_styles, None, 0, None),
        (x, demod, bias, torch.randn(1, 1, 8, 8, device=device), 0.5, 0.2, next_styles, fir, 1, None),
        (x_cl, demod, bias, None, 0.0, 0.2, None, fir, 1, None),
        (x, demod, bias, torch.randn(1, 1, 8, 8, device=device), 0.5, 0.2, next_styles, fir, 1, unscaled),
        (x_cl, demod, bias, None, 0.0, 0.2, next_styles, None, 0,
         unscaled_cl.contiguous(memory_format=torch.channels_last)),
    ]


@needs_styled_epilogue
def test_styled_epilogue_is_reached_through_the_stable_abi():
    """Without a GPU: every form of the arguments unboxes (the schema matches the C++ signature)
    and reaches the op's own device check."""
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for args in styled_epilogue_samples("cpu"):
        with pytest.raises(RuntimeError, match=r"mmfs_fast::styled_epilogue: x must be a CUDA tensor, got one on cpu"):
            torch.ops.mmfs_fast.styled_epilogue.default.redispatch(cuda_only, *args)


@needs_styled_epilogue
@pytest.mark.parametrize("sample", range(len(styled_epilogue_samples())))
def test_styled_epilogue_fake_kernel_and_opcheck_on_meta(sample):
    args = styled_epilogue_samples()[sample]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.mmfs_fast.styled_epilogue(*args)
    assert tuple(out.shape) == ((2, 3, 9, 9) if args[7] is None else (2, 3, 8, 8))
    assert out.is_contiguous(memory_format=torch.channels_last) == (sample % 2 == 1)
    torch.library.opcheck(torch.ops.mmfs_fast.styled_epilogue, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_styled_epilogue
@pytest.mark.parametrize("sample", range(len(styled_epilogue_samples())))
def test_styled_epilogue_opcheck_on_gpu(sample):
    torch.library.opcheck(torch.ops.mmfs_fast.styled_epilogue, styled_epilogue_samples("cuda")[sample])
