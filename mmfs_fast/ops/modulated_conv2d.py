"""modulated_conv2d: StyleGAN2's per-sample modulated (and demodulated) convolution,
with the official up=2 (transposed conv, then FIR blur) and down=2 (FIR blur, then
strided conv) paths, computed as the official code does: per-sample weights, one grouped
convolution. Plain PyTorch only, so there is no backend to choose (on a GPU the convolution
is cuDNN's). The Engine's default, unfused form shares one weight across the batch instead
(:func:`~mmfs_fast.models.layers.shared_weight_conv`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops._common import as_2d_kernel, blur_pads, default_fir, demodulation, weight_energy
from mmfs_fast.ops.upfirdn2d import upfirdn2d_ref


def modulate_weight(weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """(B, O, I, k, k) per-sample weights: W · s, then divided by their norm if demodulating."""
    w = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        w = w * demodulation(styles, weight_energy(weight)).to(w.dtype)[:, :, None, None, None]
    return w


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool,
                  up: int, down: int, padding: int, fir: torch.Tensor) -> torch.Tensor:
    """The official computation: batch folded into groups of one grouped convolution."""
    b, i, h, w = x.shape
    o, _, kh, kw = weight.shape
    wb = modulate_weight(weight, styles.to(weight.dtype), demodulate).to(x.dtype)
    x = x.reshape(1, b * i, h, w)
    if up == 2:
        wb = wb.transpose(1, 2).reshape(b * i, o, kh, kw)
        out = F.conv_transpose2d(x, wb, stride=2, padding=0, groups=b)
        pads = blur_pads(fir.shape[0], kh, up, down)
        out = upfirdn2d_ref(out, fir * 4, 1, 1, (pads[0], pads[1], pads[0], pads[1]))
    elif down == 2:
        pads = blur_pads(fir.shape[0], kh, up, down)
        x = upfirdn2d_ref(x, fir, 1, 1, (pads[0], pads[1], pads[0], pads[1]))
        out = F.conv2d(x, wb.reshape(b * o, i, kh, kw), stride=2, groups=b)
    else:
        out = F.conv2d(x, wb.reshape(b * o, i, kh, kw), padding=padding, groups=b)
    return out.reshape(b, o, out.shape[2], out.shape[3])


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     up: int = 1, down: int = 1, padding: int | None = None,
                     fir: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2 modulated convolution.

    x: (B, I, H, W). weight: (O, I, k, k), already multiplied by its equalized-lr
    scale 1/sqrt(I·k²). styles: (B, I), the output of the modulation affine layer.
    up=2: transposed conv (stride 2) then FIR blur ×4; down=2: FIR blur then conv
    stride 2; otherwise a same-size conv with ``padding`` (default k // 2).
    fir: FIR taps normalised to unit sum, 1-D (separable) or 2-D; None is [1, 3, 3, 1].
    """
    if x.ndim != 4 or weight.ndim != 4 or styles.ndim != 2:
        raise ValueError(f"modulated_conv2d: expected x (B, I, H, W), weight (O, I, k, k) and styles (B, I); "
                         f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(styles.shape)}")
    b, i = x.shape[:2]
    if weight.shape[1] != i or styles.shape != (b, i):
        raise ValueError(f"modulated_conv2d: x has {i} channels and batch {b}; weight {tuple(weight.shape)} "
                         f"and styles {tuple(styles.shape)} do not match")
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"modulated_conv2d: only square kernels are supported, got {tuple(weight.shape[2:])}")
    if not (x.is_floating_point() and weight.is_floating_point() and styles.is_floating_point()):
        raise TypeError("modulated_conv2d: x, weight and styles must be floating point")
    if not (x.device == weight.device == styles.device):
        raise ValueError(f"modulated_conv2d: x, weight and styles must share a device; got "
                         f"{x.device}, {weight.device}, {styles.device}")
    if up not in (1, 2) or down not in (1, 2) or up * down == 4:
        raise ValueError(f"modulated_conv2d: supports up=2 or down=2 or neither; got up={up}, down={down}")
    k = weight.shape[2]
    if padding is None:
        padding = k // 2 if up == down == 1 else 0
    elif up != 1 or down != 1:
        raise ValueError("modulated_conv2d: padding is fixed by the official resampling when up or down is 2")
    fir = default_fir(x.device) if fir is None else as_2d_kernel(fir).to(x.device)
    return _grouped_conv(x, weight, styles, demodulate, up, down, padding, fir)
