"""The pre-norm transformer layers of CLIP's towers and the CLIP → w+ mapper, evaluated: the
self-attention as one fused kernel, and each residual add joined to the LayerNorm that reads
the sum."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.ops import add_layer_norm


def prenorm_step(x: torch.Tensor, pending: torch.Tensor | None, norm1: nn.LayerNorm,
                 attend: Callable[[torch.Tensor], torch.Tensor], norm2: nn.LayerNorm,
                 feed_forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm layer, x + attend(norm1(x)), then + feed_forward(norm2(·)), on the residual
    stream x + pending: pending is the previous layer's feed-forward output, not yet added (or
    None). Returned the same way, (x', pending') whose sum is the layer's output, so every add
    is the pass of the LayerNorm that reads it (add_layer_norm): the next layer adds pending'."""
    if pending is None:
        normed = norm1(x)
    else:
        x, normed = add_layer_norm(x, pending, norm1.weight, norm1.bias, norm1.eps)
    x, normed = add_layer_norm(x, attend(normed), norm2.weight, norm2.bias, norm2.eps)
    return x, feed_forward(normed)


class FusedSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention, evaluated (no dropout), with softmax(QKᵀ/√d)V in
    one F.scaled_dot_product_attention call: the fused flash / memory-efficient kernel on CUDA
    (no (B, heads, L, L) scores in memory, one launch inside a CUDA graph). The heads are read
    from the in-projection and handed to the out-projection as strided views: the fused kernel
    writes (B, L, heads, d), so no copy sits between the three steps (a sequence-first caller
    gets the (B, L) rows as an (L, B) view).

    Holds the wrapped module's own parameters under its names (in_proj_weight, in_proj_bias,
    out_proj), so the state dict is unchanged. causal: a causal mask (CLIP's text transformer)
    as SDPA's is_causal, which keeps the flash kernel (it takes no explicit mask). batch_first:
    the layout of the tokens it is given, when not the wrapped module's."""

    def __init__(self, attention: nn.MultiheadAttention, causal: bool, batch_first: bool | None = None):
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("FusedSelfAttention covers one in-projection, no bias_k/v and no zero attention")
        self.num_heads, self.causal = attention.num_heads, causal
        self.batch_first = attention.batch_first if batch_first is None else batch_first
        self.dropout = attention.dropout
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.train(attention.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if (not (key is query and value is query) or need_weights or key_padding_mask is not None
                or (self.causal and attn_mask is not None)):
            raise ValueError("FusedSelfAttention: self-attention only (key and value are the query), no "
                             "attention weights or padding mask, and a causal one takes no explicit mask")
        if self.training and self.dropout > 0:
            raise ValueError("FusedSelfAttention evaluates attention: it has no dropout to train with")
        width = query.shape[-1]
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, heads, width // heads))
        # → (3, B, heads, L, d) from (B, L, 3, heads, d) or, sequence-first, (L, B, 3, heads, d)
        q, k, v = qkv.permute((2, 0, 3, 1, 4) if self.batch_first else (2, 1, 3, 0, 4))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal or is_causal)
        batch, length = q.shape[0], q.shape[2]
        out = self.out_proj(out.transpose(1, 2).reshape(batch * length, width)).view(batch, length, width)
        return (out if self.batch_first else out.transpose(0, 1)), None
