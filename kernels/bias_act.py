"""bias_act in Triton: ``clamp(act(x + bias) * gain)`` and its gradient, elementwise.

The gradient kernel recomputes ``x + bias`` instead of reading the output (as the
official CUDA op does) so that it stays right for any sign of ``gain``. Its result
is ``dy * slope(x + bias)``, linear in ``dy`` with a piecewise-constant slope, so
the second-order backward is the same kernel applied to the incoming gradient.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

ACT_IDS = {"linear": 0, "relu": 1, "lrelu": 2}

# Elementwise and memory bound: one block size, large enough for wide vector loads.
BLOCK = 1024


@triton.jit
def _biased(x_ptr, bias_ptr, offs, mask, channels, inner, HAS_BIAS: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + (offs // inner) % channels, mask=mask).to(tl.float32)
    return x


@triton.jit
def _slope(x, alpha, ACT: tl.constexpr):
    """d act / dx at x; relu and lrelu take the left slope at 0, as torch does."""
    if ACT == 1:
        return tl.where(x > 0, 1.0, 0.0)
    if ACT == 2:
        return tl.where(x > 0, 1.0, alpha)
    return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def bias_act_kernel(x_ptr, bias_ptr, out_ptr, n, channels, inner, alpha, gain, clamp,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _biased(x_ptr, bias_ptr, offs, mask, channels, inner, HAS_BIAS)
    y = x * _slope(x, alpha, ACT) * gain
    if HAS_CLAMP:
        y = tl.minimum(tl.maximum(y, -clamp), clamp)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_act_grad_kernel(dy_ptr, x_ptr, bias_ptr, dx_ptr, n, channels, inner, alpha, gain, clamp,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _biased(x_ptr, bias_ptr, offs, mask, channels, inner, HAS_BIAS)
    slope = _slope(x, alpha, ACT) * gain
    if HAS_CLAMP:
        # torch.clamp passes the gradient where the value lies inside [-clamp, clamp].
        y = x * slope
        slope = tl.where((y >= -clamp) & (y <= clamp), slope, 0.0)
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + offs, (dy * slope).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, inputs, x, bias, act, alpha, gain, clamp, dim):
    out = torch.empty_like(x)
    n = x.numel()
    channels = x.shape[dim]
    inner = math.prod(x.shape[dim + 1:])
    wrap_triton(kernel)[(triton.cdiv(n, BLOCK),)](
        *inputs, x if bias is None else bias, out, n, channels, inner, alpha, gain,
        0.0 if clamp is None else clamp,
        HAS_BIAS=bias is not None, ACT=ACT_IDS[act], HAS_CLAMP=clamp is not None, BLOCK=BLOCK)
    return out


def bias_act(x, bias, act, alpha, gain, clamp, dim):
    """x and bias contiguous; the result has x's dtype."""
    return _launch(bias_act_kernel, (x,), x, bias, act, alpha, gain, clamp, dim)


def bias_act_grad(dy, x, bias, act, alpha, gain, clamp, dim):
    """dy · d bias_act / dx at x; dy, x and bias contiguous."""
    return _launch(bias_act_grad_kernel, (dy, x), x, bias, act, alpha, gain, clamp, dim)
