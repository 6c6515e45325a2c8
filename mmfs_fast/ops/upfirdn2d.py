"""upfirdn2d: upsample by zero insertion, pad (negative pads crop), FIR filter
(true convolution, kernel flipped), downsample by keeping every ``down``-th sample.
The semantics of the official StyleGAN2/MMFS op.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _cuda, _triton
from mmfs_fast.ops._common import as_2d_kernel, check_on_x_device, output_size, parse_pad


def _check(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: tuple[int, int, int, int]) -> None:
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point() or not kernel.is_floating_point():
        raise TypeError(f"upfirdn2d: x and kernel must be floating point, got {x.dtype} and {kernel.dtype}")
    check_on_x_device("upfirdn2d", x, kernel=kernel)
    for name, factor in (("up", up), ("down", down)):
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"upfirdn2d: {name} must be a positive int, got {factor!r}")
    kh, kw = kernel.shape
    out_h = output_size(x.shape[2], kh, up, down, pad[2], pad[3])
    out_w = output_size(x.shape[3], kw, up, down, pad[0], pad[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d: input {tuple(x.shape[2:])} with kernel {kh}x{kw}, up={up}, "
                         f"down={down}, pad={pad} leaves an empty output ({out_h}x{out_w})")


def upfirdn2d_ref(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int,
                  pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Plain PyTorch; differentiable to any order through autograd."""
    n, c, h, w = x.shape
    x0, x1, y0, y1 = pad
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    if x0 == x1 >= 0 and y0 == y1 >= 0:
        # every blur MMFS runs: the convolution pads by itself, without a padded copy of x
        padding = (y0, x0)
    else:
        x = F.pad(x, (max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)))
        x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
        padding = 0
    weight = kernel.flip((0, 1)).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, padding=padding, groups=c)


IMPLEMENTATIONS = {"ref": upfirdn2d_ref, "cuda": _cuda.upfirdn2d, "triton": _triton.upfirdn2d}


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: int | Sequence[int] = 0, impl: str = "auto") -> torch.Tensor:
    """Upsample, FIR-filter and downsample a batch of images.

    x: (N, C, H, W). kernel: 2-D FIR taps, or 1-D taps of a separable filter.
    pad: int, (p0, p1) for both axes, or (x0, x1, y0, y1); negative values crop.
    Output size per axis: (in * up + pad0 + pad1 - k) // down + 1.
    """
    pad = parse_pad(pad)
    kernel = as_2d_kernel(kernel)
    _check(x, kernel, up, down, pad)
    name = _backend.resolve("upfirdn2d", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, kernel, up, down, pad)
