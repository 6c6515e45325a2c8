"""linear_silu: ``silu(alpha · x @ weightᵀ + bias)``, a linear layer and its SiLU in one kernel
(the activation in the GEMM's epilogue). CLIP's QuickGELU MLP runs its c_fc this way
(QuickGELU(h) = silu(1.702 h) / 1.702, the 1.702 as alpha): one kernel instead of a GEMM and a
pass over its output in each of the 24 blocks of the two towers.

The product accumulates in fp32 (or wider) and the result is written in x's dtype.
Differentiable to any order on both backends (CLIP's losses take the image gradient): triton's
backward recomputes the pre-activation with one GEMM and forms the gradients with ATen ops on
the saved inputs, which autograd differentiates again; ref is plain autograd.

Backends: ref and triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _triton
from mmfs_fast.ops._common import check_on_x_device


def linear_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """Plain PyTorch; differentiable to any order through autograd."""
    return F.silu(torch.addmm(bias.to(x.dtype), x, weight.t(), alpha=alpha))


IMPLEMENTATIONS = {"ref": linear_silu_ref, "triton": _triton.linear_silu}


def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float = 1.0,
                impl: str = "auto") -> torch.Tensor:
    """``silu(alpha · x @ weightᵀ + bias)``.

    x: (M, K), any float dtype; weight: (N, K) and bias: (N,), x's dtype (the bias may be fp32)."""
    if not x.is_floating_point() or x.ndim != 2:
        raise ValueError(f"linear_silu: x must be a 2-D floating-point tensor (rows, width), got "
                         f"{x.ndim}-D {x.dtype}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_silu: weight must have shape (outputs, {x.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"linear_silu: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_silu: bias must have shape {(weight.shape[0],)}, got {tuple(bias.shape)}")
    check_on_x_device("linear_silu", x, weight=weight, bias=bias)
    name = _backend.resolve("linear_silu", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, weight, bias, float(alpha))
