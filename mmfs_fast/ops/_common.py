"""What the op modules and their backends share: the FIR, the resampling pads and sizes, and
the modulation/demodulation coefficients. It imports no other module of mmfs_fast.ops, so
the op modules import the backends and both import this, never the reverse."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F

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


def check_on_x_device(op: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """An op's argument check: each of ``tensors`` (None: not given) on x's device."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a custom op's output for input x (csrc/common.h's rule): channels_last
    exactly when x is channels_last and not also contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def blurred_size(x: torch.Tensor, blur: torch.Tensor | None, pad: int) -> tuple[int, int]:
    """x's (H, W) after styled_epilogue's blur, if any: upfirdn2d with up = down = 1 and ``pad`` on
    every side."""
    h, w = x.shape[2:]
    if blur is None:
        return h, w
    return output_size(h, blur.shape[0], 1, 1, pad, pad), output_size(w, blur.shape[1], 1, 1, pad, pad)


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
    the (O, I) :func:`weight_energy` of W. Batched over leading dimensions: styles (..., B, I)
    and energy (..., O, I) give (..., B, O).

    In at least fp32 whatever the inputs' dtype, and outside autocast, which would run the
    product in bf16/fp16: the sums of squares of 512 or more terms need fp32's range and
    precision."""
    acc = torch.promote_types(_accumulation_dtype(styles), energy.dtype)
    device = styles.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        return torch.rsqrt(styles.to(acc).square() @ energy.to(acc).mT + DEMOD_EPS)


def full_convolution(weight: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """W ∗ taps, the full 2-D convolution of each (O, I) kernel of ``weight`` (O, I, k, k) with
    the (f, f) ``taps``: (O, I, k + f − 1, k + f − 1), in at least fp32."""
    o, i, k, _ = weight.shape
    f = taps.shape[0]
    acc = _accumulation_dtype(weight)
    # a convolution is the correlation with the flipped taps over W padded by f − 1
    return F.conv2d(weight.to(acc).reshape(o * i, 1, k, k), taps.to(device=weight.device, dtype=acc).flip((0, 1))[None, None],
                    padding=f - 1).reshape(o, i, k + f - 1, k + f - 1)


def blur_folded_down_weight(weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """(O, I, k + f − 1, k + f − 1) weights G with ``conv2d(x, G, stride=s, padding=p)`` equal to
    ``conv2d(upfirdn2d(x, fir, pad=p), weight, stride=s)``: the blur before a (strided)
    convolution folded into its kernel. upfirdn2d correlates with the flipped FIR, so
    G[t] = Σ_{u+v=t} W[v]·flip(fir)[u], the full convolution W ∗ flip(fir). In at least fp32."""
    return full_convolution(weight, fir.flip((0, 1)))


def polyphase_up_pad(k: int, fir_size: int) -> int:
    """The padding of the stride-1 convolutions of :func:`polyphase_up_weight`.

    Transposed conv (stride 2, k taps) then the blur (FIR of ``fir_size`` taps, pads p0, p1 of
    :func:`blur_pads`) is one stride-2 upsampling by G = W ∗ FIR (full convolution, L = k +
    fir_size − 1 taps): out[y] = Σ_i x[i]·G[y − 2i + c] with c = fir_size − 1 − p0. Output
    phase r of y = 2a + r reads x[a − j] with tap n = 2j + r + c, 0 ≤ n < L, so j runs from
    ⌈−(r + c)/2⌉ to ⌊(L − 1 − r − c)/2⌋; a cross-correlation with pad P takes j = P − t."""
    p0, _ = blur_pads(fir_size, k, up=2, down=1)
    c, length = fir_size - 1 - p0, k + fir_size - 1
    j_max = max((length - 1 - r - c) // 2 for r in (0, 1))
    j_min = min(-((r + c) // 2) for r in (0, 1))
    if j_max != -j_min:
        raise ValueError(f"polyphase upsampling: a {k}×{k} kernel with a {fir_size}-tap FIR needs asymmetric "
                         f"pads ({j_max}, {-j_min}); only symmetric ones are implemented")
    return j_max


def polyphase_up_weight(weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """(4·O, I, T, T) weights of one stride-1 convolution (padding :func:`polyphase_up_pad`)
    whose output, pixel-shuffled by 2, equals ``upfirdn2d(conv_transpose2d(x, W, stride=2),
    fir, pad=blur_pads(...))``: channel 4·o + 2·ry + rx is output phase (ry, rx) of channel o.

    weight: (O, I, k, k) as the transposed convolution applies it (conv_transpose2d's weight
    is its (I, O) transpose); fir: the blur's 2-D taps as upfirdn2d takes them (the ×4 of the
    upsampling included). Tap t of phase r is G[2(P − t) + r + c] (see polyphase_up_pad), zero
    outside G. Folded in at least fp32."""
    o, i, k, _ = weight.shape
    f = fir.shape[0]
    pad = polyphase_up_pad(k, f)
    p0, _ = blur_pads(f, k, up=2, down=1)
    c, length = f - 1 - p0, k + f - 1
    acc = _accumulation_dtype(weight)
    full = full_convolution(weight, fir)
    taps = 2 * pad + 1
    phases = []
    for ry in (0, 1):
        for rx in (0, 1):
            rows = [2 * (pad - t) + ry + c for t in range(taps)]
            cols = [2 * (pad - t) + rx + c for t in range(taps)]
            phase = weight.new_zeros((o, i, taps, taps), dtype=acc)
            for ty, n in enumerate(rows):
                for tx, m in enumerate(cols):
                    if 0 <= n < length and 0 <= m < length:
                        phase[:, :, ty, tx] = full[:, :, n, m]
            phases.append(phase)
    return torch.stack(phases, dim=1).reshape(4 * o, i, taps, taps)
