"""The ``cuda`` backend: the kernels of csrc/, compiled ahead of time into ``mmfs_fast._C``,
which defines the ops ``torch.ops.mmfs_fast.{upfirdn2d, bias_act, bias_act_grad, styled_epilogue}``
and their CUDA kernels (an extension built before an op was added lacks it: :func:`defines`
tells). This module adds what torch.compile and autograd need: fake (meta) kernels and
backward formulas.

Backward passes are expressed with the ops themselves and plain torch ops, so they are
differentiable again: upfirdn2d's adjoint is an upfirdn2d and bias_act's gradient kernel is
its own derivative.

The public functions at the bottom have the signatures of the ``ref`` functions of the op
modules, which import this one; what both need comes from :mod:`mmfs_fast.ops._common`.
"""
from __future__ import annotations

import torch
from torch.library import register_autograd, register_fake

from mmfs_fast.ops import _backend
from mmfs_fast.ops._common import adjoint_pads, blurred_size, output_memory_format, output_size

_ops = torch.ops.mmfs_fast
# the ops csrc/bindings.cpp defines
OPS = ("upfirdn2d", "bias_act", "bias_act_grad", "styled_epilogue")


def defines(op: str) -> bool:
    """Whether the loaded extension defines ``op``."""
    return _backend.cuda_extension() is not None and hasattr(_ops, op)


def _empty_with_layout_of(x: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# ---------------------------------------------------------------- upfirdn2d


def _upfirdn2d_fake(x, kernel, up, down, pad):
    x0, x1, y0, y1 = pad
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    return _empty_with_layout_of(x, (n, c, output_size(h, kh, up, down, y0, y1), output_size(w, kw, up, down, x0, x1)))


def _upfirdn2d_setup(ctx, inputs, output):
    x, kernel, ctx.up, ctx.down, ctx.pad = inputs
    ctx.save_for_backward(kernel)
    ctx.in_size, ctx.out_size = x.shape[2:], output.shape[2:]


def _upfirdn2d_backward(ctx, grad):
    """The FIR taps are constants (registered buffers): only x gets a gradient."""
    kernel, = ctx.saved_tensors
    pad = adjoint_pads(ctx.in_size, ctx.out_size, kernel.shape, ctx.up, ctx.down, ctx.pad)
    return _ops.upfirdn2d(grad, kernel.flip((0, 1)), ctx.down, ctx.up, pad), None, None, None, None


# ---------------------------------------------------------------- bias_act


def _walkable(x: torch.Tensor) -> torch.Tensor:
    """csrc/bias_act.cu's choice: x when contiguous in either layout, else a contiguous copy."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _bias_act_fake(x, bias, slope, gain, clamp, dim):
    return torch.empty_like(_walkable(x))


def _bias_act_grad_fake(grad, x, bias, slope, gain, clamp, dim):
    return torch.empty_like(_walkable(x))


def _bias_act_setup(ctx, inputs, output):
    x, bias, *ctx.args = inputs
    ctx.save_for_backward(x, bias)


def _bias_act_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x = _ops.bias_act_grad(grad, x, bias, *ctx.args)
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[1]:
        dim = ctx.args[-1]
        grad_bias = grad_x.sum([d for d in range(x.ndim) if d != dim]).to(bias.dtype)
    return grad_x, grad_bias, None, None, None, None


def _bias_act_grad_setup(ctx, inputs, output):
    _, x, bias, *ctx.args = inputs
    ctx.save_for_backward(x, bias)


def _bias_act_grad_backward(ctx, grad_grad_x):
    """bias_act_grad is linear in grad with a piecewise-constant factor of x and bias: its
    derivative with respect to grad is itself, with respect to x and bias zero (almost everywhere)."""
    x, bias = ctx.saved_tensors
    return _ops.bias_act_grad(grad_grad_x, x, bias, *ctx.args), None, None, None, None, None, None


# ---------------------------------------------------------------- styled_epilogue


def _styled_epilogue_fake(x, demod, bias, noise, noise_strength, slope, next_styles, blur, blur_pad, unscaled_out):
    return _empty_with_layout_of(x, (*x.shape[:2], *blurred_size(x, blur, blur_pad)))


def _register() -> None:
    register_fake("mmfs_fast::upfirdn2d", _upfirdn2d_fake)
    register_fake("mmfs_fast::bias_act", _bias_act_fake)
    register_fake("mmfs_fast::bias_act_grad", _bias_act_grad_fake)
    if defines("styled_epilogue"):  # inference only: no autograd formula
        register_fake("mmfs_fast::styled_epilogue", _styled_epilogue_fake)
    register_autograd("mmfs_fast::upfirdn2d", _upfirdn2d_backward, setup_context=_upfirdn2d_setup)
    register_autograd("mmfs_fast::bias_act", _bias_act_backward, setup_context=_bias_act_setup)
    register_autograd("mmfs_fast::bias_act_grad", _bias_act_grad_backward, setup_context=_bias_act_grad_setup)


if _backend.cuda_extension() is not None:  # importing mmfs_fast._C defined the ops
    _register()

# ---------------------------------------------------------------- the backend's functions


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int,
              pad: tuple[int, int, int, int]) -> torch.Tensor:
    return _ops.upfirdn2d(x, kernel, up, down, list(pad))


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float, gain: float,
             clamp: float | None, dim: int) -> torch.Tensor:
    # The kernels know one activation, z > 0 ? z : slope · z.
    slope = {"linear": 1.0, "relu": 0.0}.get(act, alpha)
    return _ops.bias_act(x, bias, slope, gain, clamp, dim)


def styled_epilogue(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None,
                    noise_strength: float, alpha: float, next_styles: torch.Tensor | None, blur: torch.Tensor | None,
                    blur_pad: int, unscaled_out: torch.Tensor | None) -> torch.Tensor:
    return _ops.styled_epilogue(x, demod, bias, noise, noise_strength, alpha, next_styles, blur, blur_pad,
                                unscaled_out)
