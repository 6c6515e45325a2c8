"""The triton backend against ref: forward, gradients and bias_act's second order.

Small shapes run on the GPU when there is one, else on the CPU through the Triton
interpreter (TRITON_INTERPRET=1). Triton reads that variable when it decorates a
kernel, and triton.language decorates its own helpers (tl.zeros, ...) on import, so
conftest.py imports triton under the variable before any test module can. The
variable itself is set only while this module's tests run: left set, it would let
impl="triton" run on CPU tensors in every other test module.

Low-precision results follow the flash-attention rule: the triton error in fp16/bf16
is at most twice the error of ref run in the same precision, both against fp32 ref.
"""
import pytest
import torch

from conftest import TRITON_INTERPRETABLE
from mmfs_fast.models import Stylizer, set_fused_modconv
from mmfs_fast.ops import (_backend, add_layer_norm, bias_act, linear_silu, modulated_conv2d, stem_conv, styled_epilogue,
                           upfirdn2d)
from mmfs_fast.ops._common import blur_pads, default_fir

HAS_CUDA = torch.cuda.is_available()
TRITON_IMPORTED_WITHOUT_INTERPRETER = not HAS_CUDA and not TRITON_INTERPRETABLE

pytestmark = pytest.mark.skipif(not _backend.triton_installed(), reason="triton is not installed")

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# opcheck's checks: schema and autograd registration everywhere; fake tensors and AOT dispatch
# (what torch.compile needs) only on a GPU, since under the interpreter wrap_triton launches eagerly
OPCHECKS = ("test_schema", "test_autograd_registration") + (
    ("test_faketensor", "test_aot_dispatch_dynamic") if HAS_CUDA else ())


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    if HAS_CUDA:
        yield
        return
    if TRITON_IMPORTED_WITHOUT_INTERPRETER:
        pytest.skip("triton was imported before this module, without TRITON_INTERPRET=1: run "
                    "TRITON_INTERPRET=1 python -m pytest tests/test_triton_ops.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def run_both(fn, inputs, dtype, grad_out_seed=0):
    """fn(*inputs, impl) in fp32 ref, ``dtype`` ref and ``dtype`` triton: (outputs, input grads) of each."""
    results = {}
    for name, impl, dt in (("ref32", "ref", torch.float32), ("ref", "ref", dtype), ("triton", "triton", dtype)):
        leaves = [t.detach().to(dt).requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves, impl=impl)
        g = torch.Generator(device=DEVICE).manual_seed(grad_out_seed)
        dy = torch.randn(out.shape, generator=g, device=DEVICE).to(dt)
        grads = torch.autograd.grad(out, leaves, dy)
        results[name] = [out.float()] + [gr.float() for gr in grads]
    return results


def assert_matches_ref(results, dtype, floor=1e-5):
    """Each tensor of triton within 2× ref's own ``dtype`` error of fp32 ref (plus a floor)."""
    for i, (exact, low, tri) in enumerate(zip(results["ref32"], results["ref"], results["triton"])):
        scale = exact.abs().max().item() + 1e-12
        ref_err = (low - exact).abs().max().item()
        tri_err = (tri - exact).abs().max().item()
        bound = 2 * ref_err + floor * scale if dtype != torch.float32 else 1e-4 * scale
        assert tri_err <= bound, f"tensor {i}: triton error {tri_err:.3g} > {bound:.3g} (ref's own {ref_err:.3g})"


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


LOW_PRECISION = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]
DTYPES = [torch.float32] + LOW_PRECISION


# ---------------------------------------------------------------- upfirdn2d

FIR = default_fir()
UPFIRDN_CASES = {
    "blur int pad": ((1, 3, 9, 7), FIR, 1, 1, 2),
    "Upsample": ((2, 3, 6, 5), FIR * 4, 2, 1, (2, 1)),
    "encoder blur k3": ((2, 2, 8, 8), FIR, 1, 1, blur_pads(4, 3, up=1, down=2)),
    "encoder blur k1": ((1, 2, 7, 9), FIR, 1, 1, blur_pads(4, 1, up=1, down=2)),
    "decoder blur up": ((2, 2, 13, 13), FIR * 4, 1, 1, blur_pads(4, 3, up=2, down=1)),
    "down 2, odd size": ((1, 2, 9, 11), FIR, 1, 2, (1, 1)),
    "4-tuple, crops, up and down": ((2, 2, 7, 6), torch.arange(12.0).reshape(3, 4), 2, 2, (-1, 3, 0, -2)),
    "1-D taps, down 3": ((1, 1, 10, 8), torch.tensor([1.0, 2.0, 1.0]), 1, 3, (1, 0, 2, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UPFIRDN_CASES.values(), ids=UPFIRDN_CASES.keys())
def test_upfirdn2d_matches_ref(case, dtype):
    shape, kernel, up, down, pad = case
    kernel = kernel.to(DEVICE)
    results = run_both(lambda x, impl: upfirdn2d(x, kernel, up, down, pad, impl=impl), [randn(*shape)], dtype)
    assert_matches_ref(results, dtype)


# ---------------------------------------------------------------- bias_act

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
def test_bias_act_matches_ref(act, clamp, dtype):
    x, bias = randn(2, 5, 3, 7), randn(5, seed=1)
    results = run_both(lambda x, b, impl: bias_act(x, b, act, clamp=clamp, impl=impl), [x, bias], dtype)
    assert_matches_ref(results, dtype)


@pytest.mark.parametrize("dim, with_bias", [(1, False), (0, True), (-1, True)])
def test_bias_act_other_dims_and_no_bias(dim, with_bias):
    x = randn(3, 4, 5)
    bias = randn(x.shape[dim], seed=1) if with_bias else None
    args = [x] + ([bias] if with_bias else [])
    fn = lambda x, b=None, impl="ref": bias_act(x, b, "lrelu", alpha=0.1, gain=-1.5, dim=dim, impl=impl)  # noqa: E731
    assert_matches_ref(run_both(fn, args, torch.float32), torch.float32)


@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("act", ["relu", "lrelu"])
def test_bias_act_second_order_matches_ref(act, clamp):
    """What R1 needs: grads of (grad · v) with respect to dy, x and bias."""
    x, bias, dy, v = randn(2, 4, 3, 3), randn(4, seed=1), randn(2, 4, 3, 3, seed=2), randn(2, 4, 3, 3, seed=3)
    grads = {}
    for impl in ("ref", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, bias, dy)]
        y = bias_act(leaves[0], leaves[1], act, clamp=clamp, impl=impl)
        dx, = torch.autograd.grad(y, leaves[0], leaves[2], create_graph=True)
        grads[impl] = torch.autograd.grad((dx * v).sum(), leaves, materialize_grads=True)
    for got, want in zip(grads["triton"], grads["ref"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- add_layer_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(2, 5, 40), (3, 512)], ids=["tokens, odd width", "rows"])
def test_add_layer_norm_matches_ref(shape, affine, dtype):
    """Both outputs and every input's gradient; a width that is not a power of two masks the
    block's tail, whose zeros must not enter the mean or the variance."""
    width = shape[-1]
    inputs = [randn(*shape), randn(*shape, seed=1) * 3]
    if affine:
        inputs += [randn(width, seed=2), randn(width, seed=3)]

    def fn(x, residual, weight=None, bias=None, impl="ref"):
        total, normed = add_layer_norm(x, residual, weight, bias, impl=impl)
        return torch.stack([total, normed])

    assert_matches_ref(run_both(fn, inputs, dtype), dtype)


# ---------------------------------------------------------------- linear_silu

# (rows, width, outputs): ragged in every dimension (masked tails of each tile); whole tiles;
# one row (a batch-1 token); a width of several K steps
LINEAR_CASES = {"ragged": (37, 40, 70), "whole tiles": (32, 32, 64), "one row": (1, 24, 5), "long width": (9, 100, 33)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_linear_silu_matches_ref(case, dtype):
    """The output and every input's gradient, with a transposed (non-contiguous) weight."""
    rows, width, outs = case
    inputs = [randn(rows, width), randn(width, outs, seed=1).t() / width ** 0.5, randn(outs, seed=2)]
    assert_matches_ref(run_both(lambda x, w, b, impl: linear_silu(x, w, b, 1.702, impl=impl), inputs, dtype), dtype)


def test_linear_silu_second_derivatives_match_ref():
    """Its backward is ATen ops on the saved inputs: differentiable again, as ref is."""
    grads = {}
    for impl in ("triton", "ref"):
        leaves = [randn(6, 20).requires_grad_(), randn(12, 20, seed=1).requires_grad_(), randn(12, seed=2).requires_grad_()]
        y = linear_silu(*leaves, 0.7, impl=impl)
        dx, = torch.autograd.grad(y, leaves[0], randn(6, 12, seed=3), create_graph=True)
        grads[impl] = torch.autograd.grad((dx * randn(6, 20, seed=4)).sum(), leaves)
    for got, want in zip(grads["triton"], grads["ref"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- stem_conv

# (B, C, H, W, O, k): the encoder's stem in small (3 → 16 channels, 3×3); an image of one row of
# programs' worth of pixels plus a ragged tail; more output channels than one program covers
# (a second, partial channel block); a 5×5 window whose 100 taps need a 128-wide tap block
STEM_CASES = {"encoder stem": (2, 3, 9, 7, 16, 3), "ragged pixel tail": (1, 3, 13, 11, 20, 3),
              "two channel blocks": (1, 2, 6, 6, 80, 1), "5x5, 4 channels": (2, 4, 7, 5, 24, 5)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", STEM_CASES.values(), ids=STEM_CASES.keys())
def test_stem_conv_matches_ref(case, channels_last, dtype):
    """Inference only: the output, in x's layout, with channels-last weights as the Engine keeps them."""
    b, c, h, w, o, k = case
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias = randn(b, c, h, w), randn(o, c, k, k, seed=1) / k, randn(o, seed=2)
    results = {}
    for name, impl, dt in (("ref32", "ref", torch.float32), ("ref", "ref", dtype), ("triton", "triton", dtype)):
        out = stem_conv(x.to(dt).contiguous(memory_format=layout), weight.to(dt).contiguous(memory_format=layout),
                        bias, 0.2, impl=impl)
        assert out.dtype == dt and out.shape == (b, o, h, w) and out.is_contiguous(memory_format=layout)
        results[name] = [out.float()]
    assert_matches_ref(results, dtype)


def test_stem_conv_refuses_a_backward():
    x = randn(1, 3, 4, 4).requires_grad_()
    y = stem_conv(x, randn(16, 3, 3, 3, seed=1), randn(16, seed=2), impl="triton")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()


def test_stem_conv_op_passes_opcheck():
    """Inference only: no input requires grad (the op has no autograd formula to check)."""
    for layout in (torch.contiguous_format, torch.channels_last):
        args = (randn(2, 3, 5, 6).contiguous(memory_format=layout), randn(16, 3, 3, 3, seed=1), randn(16, seed=2), 0.2)
        torch.library.opcheck(torch.ops.mmfs_fast.triton_stem_conv, args, test_utils=OPCHECKS)


# ---------------------------------------------------------------- op registration

def test_registered_ops_pass_opcheck():
    """The ops with autograd, their gradients through opcheck too (OPCHECKS)."""
    ops = torch.ops.mmfs_fast
    cases = [
        (ops.triton_upfirdn2d, (randn(1, 2, 5, 6), randn(4, 4, seed=1), 2, 1, [2, 1, 2, 1])),
        (ops.triton_bias_act, (randn(2, 3, 4), randn(3, seed=1), "lrelu", 0.2, 1.4, 0.5, 1)),
        (ops.triton_bias_act_grad, (randn(2, 3, 4), randn(2, 3, 4, seed=1), randn(3, seed=2), "relu", 0.0, 1.4,
                                    None, 1)),
        (ops.triton_add_layer_norm, (randn(2, 3, 24), randn(2, 3, 24, seed=1), randn(24, seed=2), randn(24, seed=3),
                                     1e-5)),
        (ops.triton_linear_silu, (randn(5, 24), randn(20, 24, seed=1), randn(20, seed=2), 1.702)),
    ]
    for op, args in cases:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args, test_utils=OPCHECKS)


# ---------------------------------------------------------------- styled_epilogue

NOISE_BATCHES = {"none": None, "per sample": 3, "broadcast": 1}
# (blur, blur_pad, next_styles): the decoder's FIR ×4 after a transposed convolution (input
# 2r + 1, pad 1, output 2r), and an asymmetric one with a wider pad, where a wrong flip, a
# transposed axis or a wrong border shows
EPILOGUE_FORMS = {
    "plain": (None, 0, False),
    "next styles": (None, 0, True),
    "decoder blur": (FIR * 4, 1, True),
    "asymmetric blur": (torch.arange(1.0, 13.0).reshape(3, 4) / 78, 2, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise", sorted(NOISE_BATCHES))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("form", EPILOGUE_FORMS.values(), ids=EPILOGUE_FORMS.keys())
def test_styled_epilogue_matches_ref(dtype, noise, channels_last, form):
    """Inference only: outputs, no gradients. With next_styles, the activation before them too,
    in unscaled_out (NaN until written)."""
    blur, blur_pad, with_next = form
    blur = None if blur is None else blur.to(DEVICE)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, demod, bias = randn(3, 7, 9, 9), randn(3, 7, seed=1).abs() + 0.1, randn(7, seed=2)
    next_styles = randn(3, 7, seed=4) if with_next else None
    out_size = (9, 9) if blur is None else tuple(9 + 2 * blur_pad - k + 1 for k in blur.shape)
    noise_tensor = None if NOISE_BATCHES[noise] is None else randn(NOISE_BATCHES[noise], 1, *out_size, seed=3)
    results = {}
    for name, impl, dt in (("ref32", "ref", torch.float32), ("ref", "ref", dtype), ("triton", "triton", dtype)):
        x_in = x.to(dt).contiguous(memory_format=layout)
        unscaled = None
        if with_next:
            unscaled = torch.full((3, 7, *out_size), float("nan"), dtype=dt, device=DEVICE)
            unscaled = unscaled.contiguous(memory_format=layout)
        out = styled_epilogue(x_in, demod, bias, None if noise_tensor is None else noise_tensor.to(dt), 0.7,
                              next_styles=next_styles, blur=blur, blur_pad=blur_pad, unscaled_out=unscaled, impl=impl)
        assert out.dtype == dt and out.shape == (3, 7, *out_size) and out.is_contiguous(memory_format=layout)
        results[name] = [out.float()] + ([] if unscaled is None else [unscaled.float()])
    assert_matches_ref(results, dtype)


def test_styled_epilogue_refuses_a_backward():
    x = randn(1, 2, 3, 3).requires_grad_()
    y = styled_epilogue(x, randn(1, 2, seed=1), randn(2, seed=2), impl="triton")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()


def test_styled_epilogue_op_passes_opcheck():
    """Inference only: no input requires grad (the op has no autograd formula to check)."""
    x, demod, bias = randn(2, 3, 5, 5), randn(2, 3, seed=1), randn(3, seed=2)
    fused = (randn(1, 1, 4, 4, seed=3), randn(2, 3, seed=4), (FIR * 4).to(DEVICE), 1)  # blur: 5×5 → 4×4
    for noise, next_styles, blur, blur_pad in [(None, None, None, 0), (randn(2, 1, 5, 5, seed=3), None, None, 0),
                                               fused]:
        for layout in (torch.contiguous_format, torch.channels_last):
            for with_unscaled in ([False, True] if next_styles is not None else [False]):
                unscaled = torch.empty(2, 3, 4, 4, device=DEVICE).contiguous(memory_format=layout)
                args = (x.contiguous(memory_format=layout), demod, bias, noise, 0.5, 0.2, next_styles, blur, blur_pad,
                        unscaled if with_unscaled else None)
                torch.library.opcheck(torch.ops.mmfs_fast.triton_styled_epilogue, args, test_utils=OPCHECKS)


# ---------------------------------------------------------------- a whole model

def test_small_stylizer_matches_ref():
    torch.manual_seed(0)
    model = Stylizer(size=16, ngf=2, style_dim=8, n_mlp=1, clip_mapper=False).to(DEVICE)
    set_fused_modconv(model, True)  # the modulated_conv2d op (plain torch) between triton's ops
    x = torch.rand(1, 3, 16, 16, device=DEVICE) * 2 - 1
    w_plus = randn(1, 10, 8, seed=1)
    noises = [randn(1, 1, r, r, seed=2 + n) for n, r in enumerate(model.noise_resolutions)]
    outputs = {}
    for impl in ("ref", "triton"):
        model.set_impl(impl).zero_grad()
        outputs[impl] = model(x, w_plus=w_plus, noise=noises)
        outputs[impl].square().mean().backward()
        outputs[impl] = [outputs[impl].detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(outputs["triton"]) == len(outputs["ref"]) > 10
    for got, want in zip(outputs["triton"], outputs["ref"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- full MMFS shapes on a GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_full_size_upfirdn2d_and_bias_act(dtype):
    up = run_both(lambda x, impl: upfirdn2d(x, (FIR * 4).to(DEVICE), 2, 1, (2, 1), impl=impl),
                  [randn(4, 3, 256, 256)], dtype)
    assert_matches_ref(up, dtype, floor=1e-3)
    blur = run_both(lambda x, impl: upfirdn2d(x, FIR.to(DEVICE), 1, 1, blur_pads(4, 3, 1, 2), impl=impl),
                    [randn(4, 64, 256, 256)], dtype)
    assert_matches_ref(blur, dtype, floor=1e-3)
    act = run_both(lambda x, bias, impl: bias_act(x, bias, impl=impl), [randn(4, 128, 256, 256), randn(128)], dtype)
    assert_matches_ref(act, dtype, floor=1e-3)


@pytest.mark.gpu
@gpu
def test_cuda_graph_capture():
    """The decoder in fp16 replays from a CUDA graph."""
    model = Stylizer(size=64, ngf=16, style_dim=64, n_mlp=2, clip_mapper=False, impl="triton").to(DEVICE).half()
    feat = randn(2, model.decoder0.conv.weight.shape[2], 4, 4).half()
    w_plus = randn(2, 10, 64, seed=1).half()
    with torch.no_grad():
        expected = model.decode(feat, w_plus, noise="zero")  # also runs the autotuner before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.decode(feat, w_plus, noise="zero")
        graph.replay()
    torch.testing.assert_close(captured, expected)


@pytest.mark.gpu
@gpu
def test_compile_fullgraph_with_gradients():
    """A StyledConv-like chain of the three ops compiles without graph breaks, forward and backward."""
    def styled_conv(x, weight, styles, bias):
        out = modulated_conv2d(x, weight, styles, up=2)  # plain torch: no backend to choose
        return upfirdn2d(bias_act(out, bias, impl="triton"), FIR.to(DEVICE), pad=1, impl="triton")

    inputs = [randn(2, 32, 16, 16), randn(16, 32, 3, 3, seed=1) / 17, randn(2, 32, seed=2) + 1, randn(16, seed=3)]
    results = []
    for fn in (styled_conv, torch.compile(styled_conv, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        results.append([out] + list(torch.autograd.grad(out.square().sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
