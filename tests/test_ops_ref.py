"""The ref backend against the naive definitions, its argument handling, and its
first and second derivatives (gradcheck / gradgradcheck in float64)."""
import math

import numpy as np
import pytest
import torch

import naive
import torch.nn.functional as F

from mmfs_fast.ops import (add_layer_norm, backends, bias_act, linear_silu, blur_folded_down_weight, blur_pads, default_fir, modulated_conv2d,
                           polyphase_up_pad, polyphase_up_weight, stem_conv, styled_epilogue, upfirdn2d)
from mmfs_fast.ops._common import adjoint_pads


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- upfirdn2d ------------------------------------------------------------------
PAD_FORMS = [0, 2, (2, 1), (1, 1), (2, 2), (1, 2, 0, 3), (-1, 2, 3, -2), (0, -1, -1, 0)]


@pytest.mark.parametrize("pad", PAD_FORMS)
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3)])
def test_upfirdn2d_matches_definition(pad, up, down):
    x = rand(2, 3, 7, 6)
    kernel = rand(4, 3, seed=1)  # non-square, non-symmetric: catches a missing flip or transposed axes
    expected = naive.upfirdn2d(x.numpy(), kernel.numpy(), up, down,
                               pad if isinstance(pad, tuple) and len(pad) == 4
                               else ((pad,) * 4 if isinstance(pad, int) else (pad[0], pad[1], pad[0], pad[1])))
    out = upfirdn2d(x, kernel, up=up, down=down, pad=pad, impl="ref")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_upfirdn2d_separable_kernel_is_outer_product():
    x = rand(1, 2, 5, 5)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.equal(upfirdn2d(x, taps, up=2, pad=(2, 1)), upfirdn2d(x, torch.outer(taps, taps), up=2, pad=(2, 1)))


def test_default_fir_values():
    """outer([1, 3, 3, 1]) / 64 (built by device-side fills: see default_fir; the CUDA-graph
    capture that needs this is tested on a GPU in test_cuda_ops.py)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(default_fir(dtype=torch.float64), torch.outer(taps, taps) / 64, rtol=0, atol=0)
    assert default_fir("meta").shape == (4, 4)


def test_upfirdn2d_mmfs_upsample_preserves_constant_interior():
    # kernel·4 with up=2, pad (2, 1) is the MMFS Upsample: a constant image stays constant away from borders
    x = torch.full((1, 1, 8, 8), 3.0, dtype=torch.float64)
    out = upfirdn2d(x, default_fir(dtype=torch.float64) * 4, up=2, pad=(2, 1))
    assert out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], torch.full_like(out[..., 2:-2, 2:-2], 3.0))


@pytest.mark.parametrize("bad,match", [
    (dict(pad=(1, 2, 3)), "pad must be"),
    (dict(up=0), "up must be a positive int"),
    (dict(down=1.5), "down must be a positive int"),
    (dict(pad=-4), "empty output"),
])
def test_upfirdn2d_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        upfirdn2d(rand(1, 1, 4, 4), default_fir(dtype=torch.float64), **bad)


def test_upfirdn2d_rejects_bad_tensors():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        upfirdn2d(rand(3, 4, 4), default_fir(dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        upfirdn2d(rand(1, 1, 4, 4), rand(2, 2, 2))
    with pytest.raises(TypeError, match="floating point"):
        upfirdn2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), default_fir())


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2, 2, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)),
                                         (2, 2, (1, 0, -1, 2)), (3, 1, (0, 1, 2, 0)), (1, 3, (2, 2, 0, 1))])
def test_upfirdn2d_adjoint_pads_give_the_transpose(up, down, pad):
    # the cuda and triton backwards run upfirdn2d(dy, flipped kernel, down, up, adjoint_pads):
    # it must be the exact transpose, <f(x), dy> = <x, f*(dy)>, and land on x's shape
    x, kernel = rand(1, 2, 7, 6), rand(3, 4, seed=1)
    y = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    dy = rand(*y.shape, seed=2)
    pads = adjoint_pads(tuple(x.shape[2:]), tuple(y.shape[2:]), tuple(kernel.shape), up, down, pad)
    dx = upfirdn2d(dy, kernel.flip((0, 1)), up=down, down=up, pad=pads)
    assert dx.shape == x.shape
    torch.testing.assert_close((y * dy).sum(), (x * dx).sum())


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2, 2, 1)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 0, -1, 2))])
def test_upfirdn2d_derivatives(up, down, pad):
    x = rand(1, 2, 5, 4).requires_grad_()
    kernel = rand(3, 4, seed=2)
    fn = lambda x: upfirdn2d(x, kernel, up=up, down=down, pad=pad, impl="ref")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# -- bias_act -------------------------------------------------------------------
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_bias_act_matches_definition(act, clamp, dim):
    x = rand(3, 4, 5)
    bias = rand(x.shape[dim], seed=1)
    default_gain = 1.0 if act == "linear" else math.sqrt(2)
    expected = naive.bias_act(x.numpy(), bias.numpy(), act, 0.2, default_gain, clamp, dim % 3)
    np.testing.assert_allclose(bias_act(x, bias, act=act, clamp=clamp, dim=dim).numpy(), expected, rtol=1e-12)


def test_bias_act_default_is_fused_leaky_relu():
    x, bias = rand(2, 3, 4, 4), rand(3, seed=1)
    expected = torch.nn.functional.leaky_relu(x + bias[:, None, None], 0.2) * math.sqrt(2)
    torch.testing.assert_close(bias_act(x, bias), expected)


def test_bias_act_custom_alpha_gain_without_bias():
    x = rand(2, 5)
    np.testing.assert_allclose(bias_act(x, act="lrelu", alpha=0.1, gain=3.0).numpy(),
                               naive.bias_act(x.numpy(), None, "lrelu", 0.1, 3.0, None, 1))


def test_bias_act_rejects_bad_arguments():
    x = rand(2, 3, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        bias_act(x, act="gelu")
    with pytest.raises(ValueError, match="bias must be 1-D of size"):
        bias_act(x, rand(4))
    with pytest.raises(ValueError, match="out of range"):
        bias_act(x, dim=3)
    with pytest.raises(ValueError, match="clamp must be"):
        bias_act(x, clamp=-1.0)


@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
def test_bias_act_derivatives(act):
    # keep x + bias away from the kink at 0, where the derivative jumps
    x = rand(2, 3, 4)
    x = (x + 0.2 * torch.sign(x)).requires_grad_()
    bias = (0.05 * rand(3, seed=1)).requires_grad_()
    fn = lambda x, b: bias_act(x, b, act=act, clamp=2.5, impl="ref")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias))
    assert torch.autograd.gradgradcheck(fn, (x, bias))


# -- add_layer_norm -------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_add_layer_norm_matches_definition(affine):
    x, residual = rand(2, 3, 8), rand(2, 3, 8, seed=1)
    weight, bias = (rand(8, seed=2), rand(8, seed=3)) if affine else (None, None)
    total, normed = add_layer_norm(x, residual, weight, bias, eps=1e-3)
    s = x.double().numpy() + residual.double().numpy()
    mean, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    expected = (s - mean) / np.sqrt(var + 1e-3)
    if affine:
        expected = expected * weight.double().numpy() + bias.double().numpy()
    np.testing.assert_allclose(total.numpy(), s, rtol=1e-6)
    np.testing.assert_allclose(normed.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_add_layer_norm_half_storage_sums_and_normalises_in_fp32():
    """fp16 inputs whose fp16 sum rounds: the normalised row is that of the exact sum."""
    x, residual = (rand(4, 64) * 100).half(), rand(4, 64, seed=1).half()
    total, normed = add_layer_norm(x, residual)
    exact = x.float() + residual.float()
    assert total.dtype == normed.dtype == torch.float16
    torch.testing.assert_close(total, exact.half(), rtol=0, atol=0)
    torch.testing.assert_close(normed, F.layer_norm(exact, (64,)).half(), rtol=0, atol=0)


def test_add_layer_norm_derivatives():
    x, residual = rand(2, 3, 6).requires_grad_(), rand(2, 3, 6, seed=1).requires_grad_()
    weight, bias = rand(6, seed=2).requires_grad_(), rand(6, seed=3).requires_grad_()
    fn = lambda *inputs: add_layer_norm(*inputs, impl="ref")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, residual, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, residual, weight, bias))


@pytest.mark.parametrize("bad, match", [
    (dict(residual=rand(2, 7)), "residual must have x's shape"),
    (dict(weight=rand(7)), r"weight must have shape \(8,\)"),
    (dict(bias=rand(8, 1)), r"bias must have shape \(8,\)"),
    (dict(x=torch.ones(2, 8, dtype=torch.long)), "floating-point"),
])
def test_add_layer_norm_rejects_bad_arguments(bad, match):
    args = dict(x=rand(2, 8), residual=rand(2, 8, seed=1), weight=None, bias=None) | bad
    with pytest.raises(ValueError, match=match):
        add_layer_norm(**args)


# -- linear_silu -----------------------------------------------------------------

def test_linear_silu_matches_definition():
    x, weight, bias = rand(5, 7), rand(4, 7, seed=1), rand(4, seed=2)
    pre = 1.702 * x.double().numpy() @ weight.double().numpy().T + bias.double().numpy()
    np.testing.assert_allclose(linear_silu(x, weight, bias, 1.702).numpy(), pre / (1 + np.exp(-pre)),
                               rtol=1e-5, atol=1e-6)


def test_linear_silu_derivatives():
    x, weight, bias = rand(3, 5).requires_grad_(), rand(4, 5, seed=1).requires_grad_(), rand(4, seed=2).requires_grad_()
    fn = lambda *inputs: linear_silu(*inputs, alpha=0.7, impl="ref")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("bad, match", [
    (dict(x=rand(2, 3, 8)), "2-D floating-point"),
    (dict(x=torch.ones(2, 8, dtype=torch.long)), "2-D floating-point"),
    (dict(weight=rand(4, 7)), r"weight must have shape \(outputs, 8\)"),
    (dict(weight=rand(4, 8).half()), "weight must have x's dtype"),
    (dict(bias=rand(5)), r"bias must have shape \(4,\)"),
])
def test_linear_silu_rejects_bad_arguments(bad, match):
    args = dict(x=rand(2, 8), weight=rand(4, 8, seed=1), bias=rand(4, seed=2)) | bad
    with pytest.raises(ValueError, match=match):
        linear_silu(**args)


# -- stem_conv ------------------------------------------------------------------

@pytest.mark.parametrize("ksize", [1, 3, 5])
def test_stem_conv_matches_definition(ksize):
    """Each output the bias plus the zero-padded window's sum of products, then the leaky ReLU."""
    x, weight, bias = rand(2, 3, 6, 5), rand(4, 3, ksize, ksize, seed=1), rand(4, seed=2)
    got = stem_conv(x, weight, bias, alpha=0.1).numpy()
    r = ksize // 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (r, r), (r, r)))
    want = np.empty((2, 4, 6, 5))
    for i in range(6):
        for j in range(5):
            window = padded[:, :, i:i + ksize, j:j + ksize]
            want[:, :, i, j] = np.einsum("bcyx,ocyx->bo", window, weight.numpy()) + bias.numpy()
    want = np.where(want >= 0, want, 0.1 * want)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_stem_conv_half_storage_computes_in_fp32():
    """fp16 in and out, the products and sums in fp32: the fp32 result rounded once."""
    x, weight, bias = rand(1, 3, 8, 8).half(), rand(8, 3, 3, 3, seed=1).half(), rand(8, seed=2).float()
    got = stem_conv(x, weight, bias)
    want = F.leaky_relu(F.conv2d(x.float(), weight.float(), bias, padding=1), 0.2).half()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(x=rand(1, 5, 4, 4)), "x has 5 channels"),
    (dict(x=rand(3, 4, 4)), "4-D"),
    (dict(weight=rand(4, 3, 2, 2)), r"weight must be \(O, 3, k, k\) with an odd k"),
    (dict(weight=rand(4, 2, 3, 3)), r"weight must be \(O, 3, k, k\)"),
    (dict(bias=rand(5)), r"bias must have shape \(4,\)"),
])
def test_stem_conv_rejects_bad_arguments(bad, match):
    args = dict(x=rand(1, 3, 4, 4), weight=rand(4, 3, 3, 3), bias=rand(4)) | bad
    with pytest.raises(ValueError, match=match):
        stem_conv(**args)


# -- styled_epilogue ------------------------------------------------------------
# (blur, blur_pad, next_styles) on a 5×5 x: the decoder's FIR ×4 after a transposed convolution
# (2r + 1 → 2r with pad 1), and an asymmetric one with a wider pad, where a wrong flip, a transposed
# axis or a wrong border shows
EPILOGUE_FORMS = {
    "plain": (None, 0, False),
    "next styles": (None, 0, True),
    "decoder blur": (default_fir(dtype=torch.float64) * 4, 1, True),
    "asymmetric blur": (torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4), 2, False),
}


def epilogue_inputs(form, noise_batch, dtype=torch.float64):
    """x, demod, bias, noise (of the output's size), next_styles, blur, blur_pad."""
    blur, blur_pad, with_next = EPILOGUE_FORMS[form]
    x, demod, bias = rand(2, 3, 5, 5).to(dtype), (rand(2, 3, seed=1).abs() + 0.1).to(dtype), rand(3, seed=2).to(dtype)
    out_size = (5, 5) if blur is None else tuple(5 + 2 * blur_pad - k + 1 for k in blur.shape)
    noise = None if noise_batch is None else rand(noise_batch, 1, *out_size, seed=3).to(dtype)
    next_styles = rand(2, 3, seed=4).to(dtype) if with_next else None
    return x, demod, bias, noise, next_styles, None if blur is None else blur.to(dtype), blur_pad


def naive_epilogue(x, demod, bias, noise, strength, next_styles, blur, blur_pad):
    numpy = lambda t: None if t is None else t.double().numpy()  # noqa: E731
    return naive.styled_epilogue(numpy(x), numpy(demod), numpy(bias), numpy(noise), strength, 0.2, numpy(next_styles),
                                 numpy(blur), blur_pad)


@pytest.mark.parametrize("form", EPILOGUE_FORMS)
@pytest.mark.parametrize("noise_batch", [None, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_styled_epilogue_matches_definition(form, noise_batch, channels_last):
    x, demod, bias, noise, next_styles, blur, blur_pad = epilogue_inputs(form, noise_batch)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = styled_epilogue(x, demod, bias, noise, noise_strength=0.7, next_styles=next_styles, blur=blur,
                          blur_pad=blur_pad)
    expected = naive_epilogue(x, demod, bias, noise, 0.7, next_styles, blur, blur_pad)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("form", EPILOGUE_FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_styled_epilogue_half_precision_storage_uses_fp32_arithmetic(form, channels_last):
    x, demod, bias, noise, next_styles, blur, blur_pad = epilogue_inputs(form, 1, torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = naive_epilogue(x, demod, bias, noise, 0.7, next_styles, blur, blur_pad)
    got = styled_epilogue(x, demod, bias, noise, 0.7, next_styles=next_styles, blur=blur, blur_pad=blur_pad)
    assert got.dtype == torch.float16 and got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # one fp16 rounding of the exact result, not one per step
    np.testing.assert_array_equal(got.numpy(), torch.from_numpy(expected).half().numpy())


@pytest.mark.parametrize("form", [f for f, (_, _, with_next) in EPILOGUE_FORMS.items() if with_next])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_styled_epilogue_unscaled_out_receives_the_activation_before_next_styles(form, channels_last, dtype):
    x, demod, bias, noise, next_styles, blur, blur_pad = epilogue_inputs(form, 1, dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    expected = naive_epilogue(x, demod, bias, noise, 0.7, next_styles, blur, blur_pad)
    expected_unscaled = naive_epilogue(x, demod, bias, noise, 0.7, None, blur, blur_pad)
    unscaled = torch.full(expected.shape, float("nan"), dtype=dtype).contiguous(memory_format=layout)
    got = styled_epilogue(x, demod, bias, noise, 0.7, next_styles=next_styles, blur=blur, blur_pad=blur_pad,
                          unscaled_out=unscaled)
    for name, t, want in (("result", got, expected), ("unscaled", unscaled, expected_unscaled)):
        assert t.dtype == dtype and t.is_contiguous(memory_format=layout), name
        if dtype == torch.float16:  # one fp16 rounding of the exact value
            np.testing.assert_array_equal(t.numpy(), torch.from_numpy(want).half().numpy(), err_msg=name)
        else:
            np.testing.assert_allclose(t.numpy(), want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("bad, match", [
    (dict(demod=rand(2, 4)), "demod must have shape"),
    (dict(bias=rand(2)), "bias must have shape"),
    (dict(noise=rand(3, 1, 4, 5)), "noise must have shape"),
    (dict(noise=rand(1, 2, 4, 5)), "noise must have shape"),
    (dict(x=rand(2, 3, 4)), "4-D floating-point"),
    (dict(next_styles=rand(2, 4)), "next_styles must have shape"),
    (dict(next_styles=rand(3)), "next_styles must have shape"),
    (dict(blur_pad=1), "blur_pad is given without a blur"),
    (dict(blur=rand(4), blur_pad=1), "blur must be a non-empty 2-D floating-point FIR"),
    (dict(blur=torch.empty(0, 3), blur_pad=1), "blur must be a non-empty 2-D floating-point FIR"),
    (dict(blur=rand(3, 3), blur_pad=-1), "blur_pad must be an int >= 0"),
    (dict(blur=rand(3, 3), blur_pad=True), "blur_pad must be an int >= 0"),
    (dict(blur=rand(6, 3), blur_pad=0), "leaves nothing of x's"),
    # with a blur the noise has the output's size, not x's
    (dict(blur=rand(4, 4), blur_pad=1, noise=rand(1, 1, 4, 5)), r"noise must have shape \(1 or 2, 1, 3, 4\)"),
    (dict(next_styles=torch.empty(2, 3, device="meta")), "next_styles is on meta but x is on cpu"),
    (dict(blur=torch.empty(3, 3, device="meta"), blur_pad=1), "blur is on meta but x is on cpu"),
    (dict(unscaled_out=rand(2, 3, 4, 5)), "unscaled_out is given without next_styles"),
    (dict(next_styles=rand(2, 3), unscaled_out=rand(2, 3, 4, 4)), r"unscaled_out must be a torch.float64 tensor"
                                                                   r" of shape \(2, 3, 4, 5\)"),
    # with a blur it has the output's size, not x's
    (dict(next_styles=rand(2, 3), blur=rand(4, 4), blur_pad=1, unscaled_out=rand(2, 3, 4, 5)),
     r"of shape \(2, 3, 3, 4\)"),
    (dict(next_styles=rand(2, 3), unscaled_out=rand(2, 3, 4, 5).float()), "unscaled_out must be a torch.float64"),
    (dict(next_styles=rand(2, 3), unscaled_out=rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
     r"dense in the result's layout \(torch.contiguous_format\)"),
    (dict(next_styles=rand(2, 3), unscaled_out=rand(2, 3, 4, 10)[..., ::2]), "dense in the result's layout"),
    (dict(next_styles=rand(2, 3), unscaled_out=torch.empty(2, 3, 4, 5, dtype=torch.float64, device="meta")),
     "unscaled_out is on meta but x is on cpu"),
])
def test_styled_epilogue_rejects_bad_arguments(bad, match):
    args = dict(x=rand(2, 3, 4, 5), demod=rand(2, 3), bias=rand(3), noise=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        styled_epilogue(**args)


# -- modulated_conv2d -----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
def test_modulated_conv2d_matches_definition(k, demodulate, up, down):
    x, weight, styles = rand(2, 3, 5, 6), rand(4, 3, k, k, seed=1), rand(2, 3, seed=2)
    fir = default_fir(dtype=torch.float64)
    expected = naive.modulated_conv2d(x.numpy(), weight.numpy(), styles.numpy(), demodulate, up, down, fir.numpy())
    out = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, down=down)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fir", ["mmfs", "asymmetric"])
def test_polyphase_upsampling_equals_transposed_conv_then_blur(k, fir):
    """The four phase convolutions, interleaved, against the numpy transposed conv + upfirdn2d
    (a non-symmetric FIR catches a flip of the folded kernel or of a phase's taps)."""
    x, weight = rand(2, 3, 5, 6), rand(4, 3, k, k, seed=1)
    taps = default_fir(dtype=torch.float64) * 4 if fir == "mmfs" else rand(4, 4, seed=2)
    p0, p1 = blur_pads(4, k, up=2, down=1)
    expected = np.stack([naive.upfirdn2d(naive.conv_transpose2d_stride2(xb, weight.numpy())[None], taps.numpy(),
                                         1, 1, (p0, p1, p0, p1))[0] for xb in x.numpy()])
    phases = F.conv2d(x, polyphase_up_weight(weight, taps), padding=polyphase_up_pad(k, 4))
    assert phases.shape == (2, 16, 5, 6)
    out = F.pixel_shuffle(phases, 2)
    assert out.shape == expected.shape == (2, 4, 10, 12)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("fir", ["mmfs", "asymmetric"])
def test_blur_folded_into_a_strided_convolution_equals_blur_then_convolution(stride, fir):
    """The downsampling convolution's folded (k+3)×(k+3) kernel against the numpy upfirdn2d then
    strided convolution (a non-symmetric FIR catches a flip of the fold)."""
    x, weight = rand(2, 3, 9, 8), rand(4, 3, 3, 3, seed=1)
    taps = default_fir(dtype=torch.float64) if fir == "mmfs" else rand(4, 4, seed=2)
    expected = np.stack([naive.conv2d(naive.upfirdn2d(xb[None], taps.numpy(), 1, 1, (2, 2, 2, 2))[0], weight.numpy(),
                                      stride, 0) for xb in x.numpy()])
    folded = blur_folded_down_weight(weight, taps)
    assert folded.shape == (4, 3, 6, 6)
    out = F.conv2d(x, folded, stride=stride, padding=2)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_polyphase_upsampling_names_the_kernels_it_does_not_cover():
    # an even kernel with the 4-tap FIR would need unequal pads on the two sides
    with pytest.raises(ValueError, match="4×4 kernel with a 4-tap FIR needs asymmetric pads"):
        polyphase_up_weight(rand(2, 2, 4, 4), default_fir(dtype=torch.float64))


def test_modulated_conv2d_output_sizes_follow_the_official_layers():
    x = rand(1, 4, 8, 8)
    assert modulated_conv2d(x, rand(2, 4, 3, 3), rand(1, 4), up=2).shape == (1, 2, 16, 16)
    assert modulated_conv2d(x, rand(2, 4, 3, 3), rand(1, 4), down=2).shape == (1, 2, 4, 4)
    assert modulated_conv2d(x, rand(3, 4, 1, 1), rand(1, 4), demodulate=False).shape == (1, 3, 8, 8)


def test_modulated_conv2d_demodulated_output_is_invariant_to_style_scale():
    x, weight, styles = rand(2, 3, 6, 6), rand(4, 3, 3, 3), rand(2, 3)
    a = modulated_conv2d(x, weight, styles)
    b = modulated_conv2d(x, weight, styles * 7.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("args,match", [
    ((rand(2, 3, 5, 5), rand(4, 2, 3, 3), rand(2, 3)), "do not match"),
    ((rand(2, 3, 5, 5), rand(4, 3, 3, 3), rand(1, 3)), "do not match"),
    ((rand(2, 3, 5), rand(4, 3, 3, 3), rand(2, 3)), "expected x"),
    ((rand(2, 3, 5, 5), rand(4, 3, 3, 2), rand(2, 3)), "square"),
])
def test_modulated_conv2d_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        modulated_conv2d(*args)


def test_modulated_conv2d_rejects_bad_resampling():
    x, weight, styles = rand(1, 3, 5, 5), rand(4, 3, 3, 3), rand(1, 3)
    with pytest.raises(ValueError, match="up=2 or down=2"):
        modulated_conv2d(x, weight, styles, up=2, down=2)
    with pytest.raises(ValueError, match="padding is fixed"):
        modulated_conv2d(x, weight, styles, up=2, padding=1)


@pytest.mark.parametrize("up,down,demodulate", [(1, 1, True), (2, 1, True), (1, 2, True), (1, 1, False)])
def test_modulated_conv2d_derivatives(up, down, demodulate):
    x = rand(2, 2, 4, 4).requires_grad_()
    weight = rand(3, 2, 3, 3, seed=1).requires_grad_()
    styles = rand(2, 2, seed=2).requires_grad_()
    fn = lambda x, w, s: modulated_conv2d(x, w, s, demodulate=demodulate, up=up, down=down)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, styles))
    assert torch.autograd.gradgradcheck(fn, (x, weight, styles))


# -- backend selection ----------------------------------------------------------
def test_auto_runs_ref_on_cpu_and_backends_lists_ref():
    assert all("ref" in impls for impls in backends().values())
    x = rand(1, 1, 4, 4)
    torch.testing.assert_close(upfirdn2d(x, default_fir(dtype=torch.float64), impl="auto"),
                               upfirdn2d(x, default_fir(dtype=torch.float64), impl="ref"))


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be"):
        bias_act(rand(2, 2), impl="fast")


def test_cuda_impl_on_cpu_tensor_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="cuda"):
        bias_act(rand(2, 2), impl="cuda")
