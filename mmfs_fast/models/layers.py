"""StyleGAN2 building blocks in the rosinality layout (equalized learning rate).

Module and parameter names are part of the official checkpoint keys, so they
follow SPEC §2 exactly (e.g. ``conv.modulation.weight``, ``activate.bias``, the
``nn.Sequential`` indices of ``ConvLayer``). Every resampling, bias+activation and
modulated convolution goes through :mod:`mmfs_fast.ops`, so the whole model runs on
the backend named by each layer's ``impl`` attribute (see :func:`set_impl`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.ops import bias_act, blur_pads, default_fir, demodulation, modulated_conv2d, upfirdn2d, weight_energy

FIR_SIZE = default_fir().shape[0]  # every resampling uses the [1, 3, 3, 1] FIR


def set_impl(module: nn.Module, impl: str) -> None:
    """Route every op of ``module`` to ``impl`` ('auto', 'ref', 'cuda' or 'triton')."""
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl


def table_channels(res: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's channel table: channel_base / res channels at resolution ``res``, at most
    channel_max. rosinality's Generator with channel multiplier m is channel_base 16384·m,
    channel_max 512, at every size (m = 2: 512 up to 64 px, 256 at 128, …, 32 at 1024)."""
    return min(channel_max, channel_base // res)


def channel_count(res: int, size: int, base: int = 64) -> int:
    """Channels at resolution ``res`` of a ``size``-pixel Stylizer or Discriminator: 8·base
    up to size/8, then halving with every doubling (base at full size): 512/512/256/128/64 at 512²."""
    return table_channels(res, base * size, 8 * base)


class PixelNorm(nn.Module):
    """StyleGAN2's pixel norm of (B, D) latents, x / sqrt(mean(x²) + 1e-8) over D: an RMS norm,
    which CUDA runs as one fused kernel (five as written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[1:], eps=1e-8)


class EqualLinear(nn.Module):
    """Linear layer, weight stored ~N(0, 1)/lr_mul and used as weight·lr_mul/sqrt(in)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return bias_act(F.linear(x, self.weight * self.scale), bias, act="lrelu", impl=self.impl)
        return F.linear(x, self.weight * self.scale, bias)


class EqualConv2d(nn.Module):
    """Conv layer, weight stored ~N(0, 1) and used as weight/sqrt(in·k²)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2)·sqrt(2)."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, act="lrelu", impl=self.impl)


class Blur(nn.Module):
    """FIR filter (kernel·up_factor²) with the given padding."""

    def __init__(self, pad: tuple[int, int], up_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", default_fir() * up_factor ** 2)
        self.pad = pad
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad, impl=self.impl)


class Upsample(nn.Module):
    """2× FIR upsampling (kernel·4, pad (2, 1))."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", default_fir() * 4)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=(2, 1), impl=self.impl)


class ConvLayer(nn.Sequential):
    """[Blur] → EqualConv2d → [FusedLeakyReLU]; the Sequential indices are checkpoint keys."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False,
                 bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            layers.append(Blur(blur_pads(FIR_SIZE, kernel_size, up=1, down=2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


def set_fused_modconv(module: nn.Module, fused: bool | None) -> None:
    """How every ModulatedConv2d of ``module`` runs: True, the modulated_conv2d op (per-sample
    weights, the official computation); False, :func:`shared_weight_conv` plus demodulation;
    None (the default), NVlabs' rule: the op in eval mode, unfused in training."""
    for m in module.modules():
        if isinstance(m, ModulatedConv2d):
            m.fused = fused


def shared_weight_conv(x: torch.Tensor, styles: torch.Tensor, weight: torch.Tensor,
                       up_blur: tuple[torch.Tensor, tuple] | None = None, impl: str = "auto") -> torch.Tensor:
    """StyleGAN2's unfused modulated convolution, before demodulation: conv(x·s, W).

    Scaling the weights' input channels by s equals scaling x's channels, so the batch shares
    one weight: one cuDNN convolution (a large GEMM on tensor cores) instead of B groups, and
    no (B, O, I, k, k) weight tensor to build or differentiate. up_blur: (FIR, pads) of the
    blur after a stride-2 transposed convolution, or None for a same-size convolution.
    """
    x = x * styles.to(x.dtype)[:, :, None, None]
    if up_blur is None:
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    kernel, pad = up_blur
    return upfirdn2d(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), kernel, pad=pad, impl=impl)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        if upsample:
            self.blur = Blur(blur_pads(FIR_SIZE, kernel_size, up=2, down=1), up_factor=2)
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.demodulate = demodulate
        self.upsample = upsample
        self.impl = "auto"
        self.fused: bool | None = None  # see set_fused_modconv

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        styles = self.modulation(style)
        weight = self.weight[0] * self.scale
        fused = not self.training if self.fused is None else self.fused
        if fused:
            # The op applies the ×4 of the upsampling blur itself; it takes the unit-sum FIR.
            fir = self.blur.kernel / 4 if self.upsample else None
            return modulated_conv2d(x, weight, styles, demodulate=self.demodulate,
                                    up=2 if self.upsample else 1, fir=fir)
        out = shared_weight_conv(x, styles, weight, (self.blur.kernel, self.blur.pad) if self.upsample else None,
                                 self.impl)
        if not self.demodulate:
            return out
        return out * demodulation(styles, weight_energy(weight)).to(out.dtype)[:, :, None, None]


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


def style_slots(n_blocks: int) -> list[int]:
    """The w+ slot each modulated layer of the synthesis pass reads, in layer order: the first
    conv, the first ToRGB, then (upsampling conv, conv, ToRGB) per block. The official indexing:
    each ToRGB shares its slot with the next block's upsampling conv."""
    return [0, 1] + [slot for n in range(n_blocks) for slot in (2 * n + 1, 2 * n + 2, 2 * n + 3)]


def synthesize(first_conv: StyledConv, first_rgb: ToRGB, blocks, feat: torch.Tensor, styles: torch.Tensor,
               noises: list[torch.Tensor | None]) -> torch.Tensor:
    """The StyleGAN2 synthesis pass shared by the Stylizer decoder and the Generator.

    blocks: (upsampling conv, conv, ToRGB) per resolution. styles: (B, n_latent, D), read as
    :func:`style_slots` says. noises: one per conv, in order.
    """
    slots = iter(style_slots(len(blocks)))
    conv_noises = iter(noises)
    feat = first_conv(feat, styles[:, next(slots)], next(conv_noises))
    rgb = first_rgb(feat, styles[:, next(slots)])
    for conv_up, conv, to_rgb in blocks:
        feat = conv_up(feat, styles[:, next(slots)], next(conv_noises))
        feat = conv(feat, styles[:, next(slots)], next(conv_noises))
        rgb = to_rgb(feat, styles[:, next(slots)], rgb)
    return rgb
