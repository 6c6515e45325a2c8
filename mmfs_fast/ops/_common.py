"""What the op modules and their backends share: the FIR, the resampling pads and sizes, and
the modulation/demodulation coefficients. It imports no other module of mmfs_fast.ops, so
the op modules import the backends and both import this, never the reverse."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

DEMOD_EPS = 1e-8


def default_fir(device=None, dtype=torch.float32) -> torch.Tensor:
    """outer([1, 3, 3, 1]) normalised to sum 1, the FIR of every MMFS resampling.

    Filled in on the device: a tensor made from host values is copied over, which a
    CUDA-graph capture forbids, and modulated_conv2d makes this one on every call
    without an explicit ``fir``."""
    taps = torch.ones(4, device=device, dtype=dtype)
    taps.narrow(0, 1, 2).fill_(3.0)
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def blur_pads(fir_size: int, k: int, up: int, down: int) -> tuple[int, int]:
    """(pad0, pad1) of the FIR blur that keeps the official output size of a k×k convolution
    with up=2 (transposed, blur after) or down=2 (blur before)."""
    if up == 2:
        p = (fir_size - 2) - (k - 1)
        return ((p + 1) // 2 + 1, p // 2 + 1)
    p = (fir_size - 2) + (k - 1)
    return ((p + 1) // 2, p // 2)


def parse_pad(pad: int | Sequence[int]) -> tuple[int, int, int, int]:
    """``pad`` as (x0, x1, y0, y1): an int pads every side, (p0, p1) both axes alike."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad
    raise ValueError(f"upfirdn2d: pad must be an int, (p0, p1) or (x0, x1, y0, y1); got {pad!r}")


def as_2d_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """A 1-D kernel is separable: it stands for its outer product with itself."""
    if kernel.ndim == 1:
        return torch.outer(kernel, kernel)
    if kernel.ndim != 2:
        raise ValueError(f"upfirdn2d: kernel must be 1-D or 2-D, got shape {tuple(kernel.shape)}")
    return kernel


def output_size(in_size: int, k: int, up: int, down: int, pad0: int, pad1: int) -> int:
    """upfirdn2d's output size along one axis."""
    return (in_size * up + pad0 + pad1 - k) // down + 1


def adjoint_pads(in_size: tuple[int, int], out_size: tuple[int, int], kernel_size: tuple[int, int], up: int,
                 down: int, pad: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Pads (x0, x1, y0, y1) that make ``upfirdn2d(dy, flipped kernel, up=down, down=up)``
    the input gradient of ``upfirdn2d(x, kernel, up, down, pad)``; sizes are (H, W)."""
    (h, w), (out_h, out_w), (kh, kw) = in_size, out_size, kernel_size
    return (kw - pad[0] - 1, w * up - out_w * down + pad[0] - up + 1,
            kh - pad[2] - 1, h * up - out_h * down + pad[2] - up + 1)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 for fp16/bf16, fp64 stays fp64


def weight_energy(weight: torch.Tensor) -> torch.Tensor:
    """Σ_taps W² of an (O, I, k, k) weight: (O, I), in at least fp32."""
    return weight.to(_accumulation_dtype(weight)).square().sum((2, 3))


def demodulation(styles: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's demodulation coefficients of modulating W by styles (B, I):
    rsqrt(Σ_{i,taps} (W·s)² + eps) = rsqrt(s² @ Σ_taps W² + eps), (B, O), with ``energy``
    the (O, I) :func:`weight_energy` of W.

    In at least fp32 whatever the inputs' dtype, and outside autocast, which would run the
    product in bf16/fp16: the sums of squares of 512 or more terms need fp32's range and
    precision."""
    acc = torch.promote_types(_accumulation_dtype(styles), energy.dtype)
    device = styles.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        return torch.rsqrt(styles.to(acc).square() @ energy.to(acc).T + DEMOD_EPS)
