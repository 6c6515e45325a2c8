"""bias_act: ``clamp(act(x + bias) * gain)`` in one op. With act="lrelu" and the
default gain it is StyleGAN2's fused leaky ReLU: ``leaky_relu(x + b, 0.2) * sqrt(2)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _cuda, _triton
from mmfs_fast.ops._common import check_on_x_device


class Activation(NamedTuple):
    default_alpha: float
    default_gain: float


ACTIVATIONS = {
    "linear": Activation(default_alpha=0.0, default_gain=1.0),
    "relu": Activation(default_alpha=0.0, default_gain=math.sqrt(2)),
    "lrelu": Activation(default_alpha=0.2, default_gain=math.sqrt(2)),
}


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, act: str, alpha: float, gain: float,
                 clamp: float | None, dim: int) -> torch.Tensor:
    """Plain PyTorch; differentiable to any order through autograd."""
    if bias is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + bias.to(x.dtype).reshape(shape)
    if act == "relu":
        x = F.relu(x)
    elif act == "lrelu":
        x = F.leaky_relu(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


IMPLEMENTATIONS = {"ref": bias_act_ref, "cuda": _cuda.bias_act, "triton": _triton.bias_act}


def bias_act(x: torch.Tensor, bias: torch.Tensor | None = None, act: str = "lrelu",
             alpha: float | None = None, gain: float | None = None, clamp: float | None = None,
             dim: int = 1, impl: str = "auto") -> torch.Tensor:
    """Add ``bias`` along ``dim``, apply ``act`` (linear | relu | lrelu), scale by ``gain``
    (default: 1 for linear, sqrt(2) otherwise) and clamp to [-clamp, clamp] when given.
    ``alpha`` is the lrelu negative slope (default 0.2).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not x.is_floating_point():
        raise TypeError(f"bias_act: x must be floating point, got {x.dtype}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"bias_act: dim {dim} is out of range for a {x.ndim}-D tensor")
    dim %= x.ndim
    if bias is not None:
        if bias.ndim != 1 or bias.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: bias must be 1-D of size x.shape[{dim}] = {x.shape[dim]}, "
                             f"got shape {tuple(bias.shape)}")
        check_on_x_device("bias_act", x, bias=bias)
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"bias_act: clamp must be >= 0, got {clamp!r}")
    spec = ACTIVATIONS[act]
    alpha = spec.default_alpha if alpha is None else float(alpha)
    gain = spec.default_gain if gain is None else float(gain)
    name = _backend.resolve("bias_act", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, bias, act, alpha, gain, clamp, dim)
