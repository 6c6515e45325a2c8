"""stem_conv: a network's first convolution, on an image of few channels (the encoder's RGB
face), with its bias and leaky ReLU in one pass: ``leaky_relu(conv2d(x, weight, bias,
padding=k // 2), alpha)``, stride 1, an odd k. With three input channels the convolution is a
sliver of arithmetic beside its output, so a convolution that writes the output and a bias +
activation pass that reads and writes it again cost three times the output's traffic where
one pass writes it once.

Computed in fp32 (or wider) and written in x's dtype, in x's layout (channels-last exactly
when x is). Inference only: the triton backend registers no autograd formula, so autograd
refuses a backward through it (the training layers keep their own convolution).

Backends: ref and triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _triton
from mmfs_fast.ops._common import check_on_x_device

MAX_IN_CHANNELS = 4  # "few": the kernel gathers every input tap of a pixel at once


def stem_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """Plain PyTorch."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.conv2d(x.to(acc), weight.to(acc), bias.to(acc), padding=weight.shape[-1] // 2)
    return F.leaky_relu(y, alpha).to(x.dtype)


IMPLEMENTATIONS = {"ref": stem_conv_ref, "triton": _triton.stem_conv}


def stem_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float = 0.2,
              impl: str = "auto") -> torch.Tensor:
    """``leaky_relu(conv2d(x, weight, bias, padding=k // 2), alpha)`` in one pass.

    x: (B, C, H, W) floating point, C ≤ 4; weight: (O, C, k, k), k odd; bias: (O,)."""
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f"stem_conv: x must be a 4-D (B, C, H, W) floating-point tensor, got {x.ndim}-D {x.dtype}")
    in_ch = x.shape[1]
    if in_ch > MAX_IN_CHANNELS:
        raise ValueError(f"stem_conv: x has {in_ch} channels; the op covers a first convolution of at most "
                         f"{MAX_IN_CHANNELS} (use a convolution and bias_act)")
    if weight.ndim != 4 or weight.shape[1] != in_ch or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"stem_conv: weight must be (O, {in_ch}, k, k) with an odd k, got {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"stem_conv: bias must have shape {(weight.shape[0],)}, got {tuple(bias.shape)}")
    check_on_x_device("stem_conv", x, weight=weight, bias=bias)
    name = _backend.resolve("stem_conv", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, weight, bias, float(alpha))
