"""StyleGAN2 discriminator (SPEC §4), with a feature mode for the D-feature L1 losses."""
from __future__ import annotations

import math

import torch
from torch import nn

from mmfs_fast.models.layers import ConvLayer, EqualLinear, ResBlock, channel_count, set_impl

FEATURE_LAYERS = (1, 3, 4, 5)  # outputs at size/2, /8, /16, /32: 256², 64², 32², 16² at 512²


class Discriminator(nn.Module):
    def __init__(self, size: int = 512, base: int = 64, stddev_group: int = 4, impl: str = "auto"):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        self.size = size
        n_blocks = int(math.log2(size)) - 2
        convs: list[nn.Module] = [ConvLayer(3, channel_count(size, size, base), 1)]
        res = size
        for _ in range(n_blocks):
            convs.append(ResBlock(channel_count(res, size, base), channel_count(res // 2, size, base)))
            res //= 2
        self.convs = nn.Sequential(*convs)
        c4 = channel_count(4, size, base)
        self.stddev_group = stddev_group
        self.final_conv = ConvLayer(c4 + 1, c4, 3)
        self.final_linear = nn.Sequential(EqualLinear(c4 * 4 * 4, c4, activation="lrelu"), EqualLinear(c4, 1))
        set_impl(self, impl)

    def minibatch_stddev(self, x: torch.Tensor) -> torch.Tensor:
        """Append one channel: the std over groups of samples, averaged over C, H, W."""
        b, c, h, w = x.shape
        group = min(b, self.stddev_group)
        if b % group:
            raise ValueError(f"batch {b} is not divisible by the stddev group {group}")
        y = x.reshape(group, -1, 1, c, h, w)
        y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8)
        y = y.mean(dim=(2, 3, 4), keepdim=True).squeeze(2)
        return torch.cat([x, y.repeat(group, 1, h, w)], dim=1)

    def forward(self, x: torch.Tensor, features: bool = False):
        """Logits (B, 1) of x (B, 3, size, size), or with ``features`` the outputs of
        convs[1], convs[3], convs[4] and convs[5]."""
        if x.ndim != 4 or x.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"x must have shape (B, 3, {self.size}, {self.size}), got {tuple(x.shape)}")
        if features:
            if len(self.convs) <= max(FEATURE_LAYERS):
                raise ValueError(f"feature mode needs size >= 128, this discriminator has size {self.size}")
            feats = []
            for i, layer in enumerate(self.convs[: max(FEATURE_LAYERS) + 1]):
                x = layer(x)
                if i in FEATURE_LAYERS:
                    feats.append(x)
            return feats
        out = self.final_conv(self.minibatch_stddev(self.convs(x)))
        return self.final_linear(out.flatten(1))
