"""CLIP embedding → w+ mapper (SPEC §3): a 4-layer pre-norm transformer over the
10 style slots, sequence-first, fed the normalised embedding plus a position
embedding per slot."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CLIPMapper(nn.Module):
    def __init__(self, dim: int = 512, n_latent: int = 10, n_layers: int = 4, n_heads: int = 8):
        super().__init__()
        self.position_embedding = nn.Parameter(torch.randn(n_latent, dim) * dim ** -0.5)
        layer = nn.TransformerEncoderLayer(dim, n_heads, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, clip_feats: torch.Tensor) -> torch.Tensor:
        """(B, dim) CLIP embeddings → (B, n_latent, dim) w+."""
        feats = F.normalize(clip_feats, dim=-1)
        tokens = feats[None] + self.position_embedding[:, None]
        return F.leaky_relu(self.transformer(tokens), 0.2).transpose(0, 1)
