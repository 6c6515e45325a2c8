"""add_layer_norm: a transformer's residual add and the LayerNorm that reads the sum, in one
pass: ``s = x + residual`` and ``layer_norm(s)`` over the last dimension, both returned (the
sum carries on as the residual stream). Two passes over the activations and their launches
become one.

The sum is formed and normalised in fp32 (or wider) and written in x's dtype. Differentiable
once on the triton backend (CLIP's losses take the image gradient; nothing differentiates them
twice): its backward is ATen's LayerNorm backward at the saved row statistics plus the sum's
gradient, and a second derivative through those statistics is refused by ATen; ref is plain
autograd, to any order.

Backends: ref and triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _triton
from mmfs_fast.ops._common import check_on_x_device


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch; differentiable to any order through autograd."""
    acc = torch.promote_types(x.dtype, torch.float32)
    total = x.to(acc) + residual.to(acc)
    normed = F.layer_norm(total, total.shape[-1:], None if weight is None else weight.to(acc),
                          None if bias is None else bias.to(acc), eps)
    return total.to(x.dtype), normed.to(x.dtype)


IMPLEMENTATIONS = {"ref": add_layer_norm_ref, "triton": _triton.add_layer_norm}


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, layer_norm(x + residual, weight, bias, eps))`` over the last dimension.

    x, residual: the same shape (..., D), any float dtype (both results have x's); weight, bias:
    None or (D,)."""
    if not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"add_layer_norm: x must be a floating-point tensor of at least 1 dimension, got "
                         f"{x.ndim}-D {x.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(f"add_layer_norm: {name} must have shape {(width,)}, got {tuple(t.shape)}")
    check_on_x_device("add_layer_norm", x, residual=residual, weight=weight, bias=bias)
    name = _backend.resolve("add_layer_norm", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, residual, weight, bias, float(eps))
