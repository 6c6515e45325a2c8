"""The rosinality StyleGAN2 generator: the Stage I teacher whose mapping network and
64–512 px layers seed the Stylizer decoder. Its channel table is fixed per resolution,
not per model size, so that checkpoints of every size (256, 512, 1024 px …) load."""
from __future__ import annotations

import math

import torch
from torch import nn

from mmfs_fast.models import checkpoint
from mmfs_fast.models.layers import EqualLinear, PixelNorm, StyledConv, ToRGB, set_impl, synthesize, table_channels
from mmfs_fast.models.noise import NoiseSpec, make_noises


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class Generator(nn.Module):
    """``channel_base``/``channel_max``: see :func:`~mmfs_fast.models.layers.table_channels`;
    the defaults are rosinality's channel multiplier 2 (the public FFHQ checkpoints)."""

    def __init__(self, size: int = 512, style_dim: int = 512, n_mlp: int = 8, channel_base: int = 32768,
                 channel_max: int = 512, lr_mlp: float = 0.01, impl: str = "auto"):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        self.size, self.style_dim = size, style_dim
        self.channel_base, self.channel_max = channel_base, channel_max
        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="lrelu") for _ in range(n_mlp)])
        c4 = self.channels(4)
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, style_dim)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        res = 4
        while res < size:
            c_in, c_out = self.channels(res), self.channels(2 * res)
            self.convs.append(StyledConv(c_in, c_out, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(c_out, c_out, 3, style_dim))
            self.to_rgbs.append(ToRGB(c_out, style_dim))
            res *= 2
        self.n_latent = 2 * int(math.log2(size)) - 2
        self.noises = nn.Module()
        for i, r in enumerate(self.noise_resolutions):
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        set_impl(self, impl)

    @classmethod
    def from_state(cls, g: dict[str, torch.Tensor], name: str = "checkpoint", impl: str = "auto") -> "Generator":
        """The rosinality generator, of whatever size, whose state dict is ``g`` (``g_ema`` or
        ``g`` of their checkpoints), strictly loaded. Keys and shapes are checked against a
        model on the meta device first, so a file that does not fit allocates nothing."""
        config = checkpoint.stylegan2_generator_config(g, name)
        for device in ("meta", "cpu"):
            with torch.device(device):
                model = cls(**config, impl=impl)
            try:
                checkpoint.load_state(model, g)
            except checkpoint.CheckpointError as e:
                raise checkpoint.CheckpointError(f"{name}: {config['size']}-px StyleGAN2 generator: {e}") from e
        return model

    def channels(self, res: int) -> int:
        return table_channels(res, self.channel_base, self.channel_max)

    @property
    def noise_resolutions(self) -> list[int]:
        return [4] + [2 ** (i // 2 + 3) for i in range(len(self.convs))]

    def forward(self, z: torch.Tensor | None = None, w_plus: torch.Tensor | None = None,
                noise: NoiseSpec = "random", truncation: float = 1.0,
                truncation_latent: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, size, size), unclamped, from z (B, style_dim) or w_plus (B, n_latent, style_dim).
        noise: "random", "zero", "const" (the registered noise buffers) or a list of maps."""
        if (z is None) == (w_plus is None):
            raise ValueError("give exactly one of z and w_plus")
        if w_plus is None:
            w = self.style(z)
            if truncation != 1:
                w = truncation_latent + truncation * (w - truncation_latent)
            w_plus = w[:, None].expand(-1, self.n_latent, -1)
        if w_plus.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(f"w_plus must be (B, {self.n_latent}, {self.style_dim}), got {tuple(w_plus.shape)}")
        batch = w_plus.shape[0]
        if isinstance(noise, str) and noise == "const":
            noise = [getattr(self.noises, f"noise_{i}") for i in range(len(self.noise_resolutions))]
        noises = make_noises(noise, batch, self.noise_resolutions, w_plus.device, w_plus.dtype, generator)
        blocks = list(zip(self.convs[::2], self.convs[1::2], self.to_rgbs))
        return synthesize(self.conv1, self.to_rgb1, blocks, self.input(batch), w_plus, noises)
