"""The ``triton`` backend: the kernels of kernels/ (``mmfs_fast.kernels``) registered as
torch.library ops, so that torch.compile(fullgraph=True) traces through them (triton_op
+ wrap_triton) and CUDA graphs capture them, with autograd to any order.

The public functions at the bottom have the signatures of the ``ref`` functions of
the op modules. Kernel modules are imported on first use: importing triton is slow, and
it may be absent (then the backend reports itself unavailable and is never called).
"""
from __future__ import annotations

import torch
from torch.library import register_autograd, triton_op

from mmfs_fast.ops._common import adjoint_pads, blurred_size, output_memory_format, output_size

# ---------------------------------------------------------------- upfirdn2d


@triton_op("mmfs_fast::triton_upfirdn2d", mutates_args={})
def _upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: list[int]) -> torch.Tensor:
    from mmfs_fast.kernels import upfirdn2d as kernels

    (h, w), (kh, kw) = x.shape[-2:], kernel.shape
    out_size = (output_size(h, kh, up, down, pad[2], pad[3]), output_size(w, kw, up, down, pad[0], pad[1]))
    return kernels.upfirdn2d(x, kernel, up, down, pad, out_size)


def _upfirdn2d_setup(ctx, inputs, output):
    x, kernel, ctx.up, ctx.down, ctx.pad = inputs
    ctx.save_for_backward(kernel)
    ctx.in_shape, ctx.out_shape = x.shape, output.shape


def _upfirdn2d_backward(ctx, dy):
    """The FIR taps are constants (registered buffers): only x gets a gradient."""
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

# ---------------------------------------------------------------- styled_epilogue


@triton_op("mmfs_fast::triton_styled_epilogue", mutates_args={"unscaled_out"})
def _styled_epilogue(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None,
                     noise_strength: float, alpha: float, next_styles: torch.Tensor | None, blur: torch.Tensor | None,
                     blur_pad: int, unscaled_out: torch.Tensor | None) -> torch.Tensor:
    """Inference only: no autograd formula is registered, so autograd refuses a backward through it."""
    from mmfs_fast.kernels import styled_epilogue as kernels

    return kernels.styled_epilogue(x, demod, bias, noise, noise_strength, alpha, next_styles, blur, blur_pad,
                                   unscaled_out, blurred_size(x, blur, blur_pad), output_memory_format(x))


@_styled_epilogue.register_fake
def _styled_epilogue_fake(x, demod, bias, noise, noise_strength, alpha, next_styles, blur, blur_pad, unscaled_out):
    """In place of triton_op's own fake kernel (the function run on fake tensors), which the
    interpreter (TRITON_INTERPRET=1) would launch for real: the output layout is the kernel's."""
    return torch.empty((*x.shape[:2], *blurred_size(x, blur, blur_pad)), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


# ---------------------------------------------------------------- add_layer_norm


@triton_op("mmfs_fast::triton_add_layer_norm", mutates_args={})
def _add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mmfs_fast.kernels import add_layer_norm as kernels

    return kernels.add_layer_norm(x, residual, weight, bias, eps)


@_add_layer_norm.register_fake
def _add_layer_norm_fake(x, residual, weight, bias, eps):
    """In place of triton_op's own fake kernel, which the interpreter would launch (see
    _styled_epilogue_fake)."""
    rows = x.numel() // x.shape[-1]
    stats = torch.empty(rows, dtype=torch.float32, device=x.device)
    return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    total, _, mean, rstd = output
    ctx.save_for_backward(total, weight, bias, mean, rstd)
    ctx.dtypes = x.dtype, residual.dtype


def _add_layer_norm_backward(ctx, d_total, d_normed, d_mean, d_rstd):
    """LayerNorm's backward at the saved sum (ATen's, differentiable again), plus the sum's own
    gradient: both inputs of the sum get it whole. mean and 1/std are saved statistics, not
    results anyone differentiates."""
    total, weight, bias, mean, rstd = ctx.saved_tensors
    acc = torch.promote_types(total.dtype, torch.float32)  # the statistics' precision, on every device
    stats = (*total.shape[:-1], 1)
    d_sum, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
        d_normed.to(acc), total.to(acc), total.shape[-1:], mean.view(stats), rstd.view(stats),
        None if weight is None else weight.to(acc), None if bias is None else bias.to(acc),
        [True, weight is not None and ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]])
    d_sum = d_sum + d_total
    return (d_sum.to(ctx.dtypes[0]), d_sum.to(ctx.dtypes[1]), None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype), None)


register_autograd("mmfs_fast::triton_add_layer_norm", _add_layer_norm_backward, setup_context=_add_layer_norm_setup)

# ---------------------------------------------------------------- stem_conv


@triton_op("mmfs_fast::triton_stem_conv", mutates_args={})
def _stem_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """Inference only: no autograd formula is registered, so autograd refuses a backward through it."""
    from mmfs_fast.kernels import stem_conv as kernels

    return kernels.stem_conv(x, weight, bias, alpha, output_memory_format(x))


@_stem_conv.register_fake
def _stem_conv_fake(x, weight, bias, alpha):
    """In place of triton_op's own fake kernel, which the interpreter would launch (see
    _styled_epilogue_fake)."""
    return torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


# ---------------------------------------------------------------- linear_silu


@triton_op("mmfs_fast::triton_linear_silu", mutates_args={})
def _linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    from mmfs_fast.kernels import linear_silu as kernels

    return kernels.linear_silu(x, weight, bias, alpha)


@_linear_silu.register_fake
def _linear_silu_fake(x, weight, bias, alpha):
    """In place of triton_op's own fake kernel, which the interpreter would launch (see
    _styled_epilogue_fake)."""
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_silu_setup(ctx, inputs, output):
    x, weight, bias, ctx.alpha = inputs
    ctx.save_for_backward(x, weight, bias)


def _linear_silu_backward(ctx, dy):
    """ATen ops on the saved inputs (so differentiable again): the pre-activation p recomputed by
    one GEMM, silu'(p) = σ(p)(1 + p(1 − σ(p))) in fp32, then the linear layer's three gradients."""
    x, weight, bias = ctx.saved_tensors
    acc = torch.promote_types(x.dtype, torch.float32)
    pre = torch.addmm(bias.to(acc), x.to(acc), weight.t().to(acc), alpha=ctx.alpha)
    gate = torch.sigmoid(pre)
    d_pre = dy.to(acc) * gate * (1 + pre * (1 - gate))
    dx = (d_pre @ weight.to(acc)) * ctx.alpha if ctx.needs_input_grad[0] else None
    d_weight = (d_pre.t() @ x.to(acc)) * ctx.alpha if ctx.needs_input_grad[1] else None
    d_bias = d_pre.sum(0) if ctx.needs_input_grad[2] else None
    return (None if dx is None else dx.to(x.dtype), None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype), None)


register_autograd("mmfs_fast::triton_linear_silu", _linear_silu_backward, setup_context=_linear_silu_setup)

# ---------------------------------------------------------------- the backend functions


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int,
              pad: tuple[int, int, int, int]) -> torch.Tensor:
    return _upfirdn2d(x.contiguous(), kernel.float().contiguous(), up, down, list(pad))


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float, gain: float,
             clamp: float | None, dim: int) -> torch.Tensor:
    return _bias_act(x.contiguous(), None if bias is None else bias.contiguous(), act, alpha, gain, clamp, dim)


def styled_epilogue(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None,
                    noise_strength: float, alpha: float, next_styles: torch.Tensor | None, blur: torch.Tensor | None,
                    blur_pad: int, unscaled_out: torch.Tensor | None) -> torch.Tensor:
    walkable = x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()
    return _styled_epilogue(walkable, demod.float().contiguous(), bias.float().contiguous(),
                            None if noise is None else noise.contiguous(), noise_strength, alpha,
                            None if next_styles is None else next_styles.float().contiguous(),
                            None if blur is None else blur.float().contiguous(), blur_pad, unscaled_out)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total, normed, _, _ = _add_layer_norm(x.contiguous(), residual.contiguous(),
                                          None if weight is None else weight.contiguous(),
                                          None if bias is None else bias.contiguous(), eps)
    return total, normed


def stem_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    return _stem_conv(x, weight.to(x.dtype), bias.float().contiguous(), alpha)


def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    return _linear_silu(x, weight, bias.contiguous(), alpha)
