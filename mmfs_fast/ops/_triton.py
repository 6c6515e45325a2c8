"""The ``triton`` backend: the kernels of kernels/ (``mmfs_fast.kernels``) registered as
torch.library ops, so that torch.compile(fullgraph=True) traces through them (triton_op
+ wrap_triton) and CUDA graphs capture them, with autograd to any order.

The public functions at the bottom have the signatures of the ``ref`` functions of
the op modules. Kernel modules are imported on first use: importing triton is slow,
it may be absent (then the backend reports itself unavailable and is never called),
and they import the op modules, which import this one.

Where ``impl="auto"`` places triton is measured (_backend.FASTEST_FIRST_PER_OP): on an
H200 its modulated_conv2d was 1.8× slower than cuDNN's grouped convolution and 3.7× faster
than the first CUDA kernel (an implicit GEMM on CUDA cores, since replaced by cuDNN).
"""
from __future__ import annotations

import torch
from torch.library import register_autograd, triton_op

# ---------------------------------------------------------------- upfirdn2d


@triton_op("mmfs_fast::triton_upfirdn2d", mutates_args={})
def _upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: list[int]) -> torch.Tensor:
    from mmfs_fast.kernels import upfirdn2d as kernels

    return kernels.upfirdn2d(x, kernel, up, down, pad)


def _upfirdn2d_setup(ctx, inputs, output):
    x, kernel, ctx.up, ctx.down, ctx.pad = inputs
    ctx.save_for_backward(kernel)
    ctx.in_shape, ctx.out_shape = x.shape, output.shape


def _upfirdn2d_backward(ctx, dy):
    """The FIR taps are constants (registered buffers): only x gets a gradient."""
    from mmfs_fast.ops.upfirdn2d import adjoint_pads

    kernel, = ctx.saved_tensors
    pad = adjoint_pads(ctx.in_shape[2:], ctx.out_shape[2:], kernel.shape, ctx.up, ctx.down, ctx.pad)
    dx = _upfirdn2d(dy.contiguous(), kernel.flip((0, 1)).contiguous(), ctx.down, ctx.up, list(pad))
    return dx, None, None, None, None


register_autograd("mmfs_fast::triton_upfirdn2d", _upfirdn2d_backward, setup_context=_upfirdn2d_setup)

# ---------------------------------------------------------------- bias_act


@triton_op("mmfs_fast::triton_bias_act", mutates_args={})
def _bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float, gain: float,
              clamp: float | None, dim: int) -> torch.Tensor:
    from mmfs_fast.kernels import bias_act as kernels

    return kernels.bias_act(x, bias, act, alpha, gain, clamp, dim)


@triton_op("mmfs_fast::triton_bias_act_grad", mutates_args={})
def _bias_act_grad(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float,
                   gain: float, clamp: float | None, dim: int) -> torch.Tensor:
    from mmfs_fast.kernels import bias_act as kernels

    return kernels.bias_act_grad(dy, x, bias, act, alpha, gain, clamp, dim)


def _bias_act_setup(ctx, inputs, output):
    x, bias, *ctx.params = inputs
    ctx.save_for_backward(x, bias)


def _bias_act_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx = _bias_act_grad(dy.contiguous(), x, bias, *ctx.params)
    dbias = None
    if bias is not None and ctx.needs_input_grad[1]:
        dim = ctx.params[-1]
        dbias = dx.sum([d for d in range(dx.ndim) if d != dim], dtype=torch.float32).to(bias.dtype)
    return dx, dbias, None, None, None, None, None


def _bias_act_grad_setup(ctx, inputs, output):
    _, x, bias, *ctx.params = inputs
    ctx.save_for_backward(x, bias)


def _bias_act_grad_backward(ctx, ddx):
    """dx = dy · slope(x + bias) with a piecewise-constant slope: linear in dy, flat in x and bias."""
    x, bias = ctx.saved_tensors
    return _bias_act_grad(ddx.contiguous(), x, bias, *ctx.params), None, None, None, None, None, None, None


register_autograd("mmfs_fast::triton_bias_act", _bias_act_backward, setup_context=_bias_act_setup)
register_autograd("mmfs_fast::triton_bias_act_grad", _bias_act_grad_backward, setup_context=_bias_act_grad_setup)

# ---------------------------------------------------------------- modulated_conv2d


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's cuDNN setting, so the triton and ref convolutions round alike."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


@triton_op("mmfs_fast::triton_modulated_conv2d", mutates_args={})
def _modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demod: torch.Tensor | None,
                      up: int, stride: int, padding: int, out_h: int, out_w: int) -> torch.Tensor:
    """``demod`` (B, O) must be positive: the backward divides by it."""
    from mmfs_fast.kernels import modulated_conv2d as kernels

    return kernels.modulated_conv2d(x, weight, styles, demod, up, stride, padding, out_h, out_w,
                                    _dot_precision(x.dtype))


def _modulated_conv2d_setup(ctx, inputs, output):
    x, weight, styles, demod, ctx.up, ctx.stride, ctx.padding, _, _ = inputs
    ctx.save_for_backward(x, weight, styles, demod, output)


def _input_grad_mode(weight: torch.Tensor, up: int, stride: int, padding: int):
    """(weight, up, stride, padding) of the convolution that maps dy back onto x."""
    k = weight.shape[2]
    flipped = weight.transpose(0, 1)
    if up == 2:
        return flipped.contiguous(), 1, 2, padding
    if stride == 2:
        return flipped.contiguous(), 2, 1, padding
    return flipped.flip((2, 3)).contiguous(), 1, 1, k - 1 - padding


def _weight_grad(ctx, dy_scaled, x_scaled, weight, out_shape):
    """The ordinary whole-batch weight gradient of conv(styles·x, W) at dy·demod (cuDNN)."""
    transposed = ctx.up == 2
    stride = 2 if transposed else ctx.stride
    output_padding = [0, 0]
    if transposed:
        output_padding = [out - ((size - 1) * stride - 2 * ctx.padding + weight.shape[2])
                          for out, size in zip(out_shape[2:], x_scaled.shape[2:])]
    _, dweight, _ = torch.ops.aten.convolution_backward(
        dy_scaled, x_scaled, (weight.transpose(0, 1) if transposed else weight).to(x_scaled.dtype), None,
        [stride] * 2, [ctx.padding] * 2, [1, 1], transposed, output_padding, 1, [False, True, False])
    return (dweight.transpose(0, 1) if transposed else dweight).to(weight.dtype)


def _modulated_conv2d_backward(ctx, dy):
    x, weight, styles, demod, y = ctx.saved_tensors
    dy = dy.contiguous()
    dy_scale = torch.ones_like(dy[:, :, 0, 0]) if demod is None else demod
    styles_4d = styles[:, :, None, None].to(x.dtype)
    dx = dweight = dstyles = ddemod = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        # The transposed convolution of dy·demod; unmodulated, it also gives the styles gradient.
        dx_weight, dx_up, dx_stride, dx_padding = _input_grad_mode(weight, ctx.up, ctx.stride, ctx.padding)
        dx_raw = _modulated_conv2d(dy, dx_weight, dy_scale.contiguous(), None, dx_up, dx_stride, dx_padding,
                                   x.shape[2], x.shape[3])
        dx = dx_raw * styles_4d
        dstyles = (dx_raw.float() * x.float()).sum((2, 3)).to(styles.dtype)
    if ctx.needs_input_grad[1]:
        dweight = _weight_grad(ctx, dy * dy_scale[:, :, None, None].to(dy.dtype), x * styles_4d, weight, y.shape)
    if demod is not None and ctx.needs_input_grad[3]:
        ddemod = (dy.float() * y.float()).sum((2, 3)) / demod
    return dx, dweight, dstyles, ddemod, None, None, None, None, None


register_autograd("mmfs_fast::triton_modulated_conv2d", _modulated_conv2d_backward,
                  setup_context=_modulated_conv2d_setup)

# ---------------------------------------------------------------- the backend functions


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int,
              pad: tuple[int, int, int, int]) -> torch.Tensor:
    return _upfirdn2d(x.contiguous(), kernel.float().contiguous(), up, down, list(pad))


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float, gain: float,
             clamp: float | None, dim: int) -> torch.Tensor:
    return _bias_act(x.contiguous(), None if bias is None else bias.contiguous(), act, alpha, gain, clamp, dim)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool,
                     up: int, down: int, padding: int, fir: torch.Tensor) -> torch.Tensor:
    from mmfs_fast.ops.modulated_conv2d import DEMOD_EPS, blur_pads

    x, weight, styles = x.contiguous(), weight.contiguous(), styles.contiguous()
    k = weight.shape[2]
    demod = None
    if demodulate:
        # rsqrt(Σ_{i,taps} (W·s)²) = rsqrt(s² @ Σ_taps W²): a (B, I) × (I, O) product, in fp32.
        energy = styles.float().square() @ weight.float().square().sum((2, 3)).T
        demod = torch.rsqrt(energy + DEMOD_EPS)
    fir_pads = list(blur_pads(fir.shape[0], k, up, down)) * 2
    if up == 2:
        h, w = x.shape[2:]
        out = _modulated_conv2d(x, weight, styles, demod, 2, 1, 0, (h - 1) * 2 + k, (w - 1) * 2 + k)
        return upfirdn2d(out, fir * 4, 1, 1, fir_pads)
    if down == 2:
        x = upfirdn2d(x, fir, 1, 1, fir_pads)
    h, w = x.shape[2:]
    out_h, out_w = (h + 2 * padding - k) // down + 1, (w + 2 * padding - k) // down + 1
    return _modulated_conv2d(x, weight, styles, demod, 1, down, padding, out_h, out_w)
