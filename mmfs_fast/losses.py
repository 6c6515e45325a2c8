"""The MMFS fine-tuning losses (SPEC §6, stage IV), also used by Stage II (structure).

- directional CLIP: 1 − cos(d_fake, d_prompt), d_fake = n(CLIP(fake)) − n(CLIP(x));
- DINO structure: Σ_b MSE(S_b(fake), S_b(source)), S the cosine self-similarity of the
  last block's keys, source without gradient;
- token projection (image prompts): L1(UUᵀT − T), U the SVD basis of the reference's
  per-token-normalised layer-4 CLIP tokens arranged D×N, T the fake's tokens alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def directional_clip_loss(fake_emb: torch.Tensor, src_emb: torch.Tensor, prompt_dir: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − cos(n(fake_emb) − n(src_emb), prompt_dir).

    fake_emb, src_emb: (B, D) CLIP embeddings of the stylized and the input faces;
    prompt_dir: (D,) or (B, D) direction from the source domain to the prompt.
    """
    if fake_emb.shape != src_emb.shape:
        raise ValueError(f"fake_emb {tuple(fake_emb.shape)} and src_emb {tuple(src_emb.shape)} differ in shape")
    d_fake = F.normalize(fake_emb, dim=-1) - F.normalize(src_emb, dim=-1)
    prompt_dir = prompt_dir.expand_as(d_fake)
    return (1 - F.cosine_similarity(d_fake, prompt_dir, dim=-1)).mean()


def structure_loss(sim_fake: torch.Tensor, sim_source: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of MSE(S_b(fake), S_b(source)); (B, N, N) self-similarities, source detached."""
    if sim_fake.shape != sim_source.shape or sim_fake.ndim != 3:
        raise ValueError(f"expected two (B, N, N) self-similarities of one shape, got {tuple(sim_fake.shape)} "
                         f"and {tuple(sim_source.shape)}")
    return (sim_fake - sim_source.detach()).square().mean(dim=(1, 2)).sum()


def dino_structure_loss(dino, fake: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """:func:`structure_loss` of images in [-1, 1], computing both self-similarities with ``dino``."""
    with torch.no_grad():
        sim_source = dino.self_similarity(source)
    return structure_loss(dino.self_similarity(fake), sim_source)


def _token_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """(..., N, D) tokens → (..., D, N), each token L2-normalised, in at least float32."""
    tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    return F.normalize(tokens, dim=-1).transpose(-1, -2)


def token_basis(ref_tokens: torch.Tensor) -> torch.Tensor:
    """(N, D) or (R, N, D) reference tokens → U (D, K): orthonormal basis of their span.

    With several references their tokens are pooled into one D × (R·N) matrix."""
    if ref_tokens.ndim not in (2, 3):
        raise ValueError(f"ref_tokens must be (N, D) or (R, N, D), got {tuple(ref_tokens.shape)}")
    matrix = _token_matrix(ref_tokens.detach().reshape(-1, ref_tokens.shape[-1]))
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u


def projection_loss(fake_tokens: torch.Tensor, ref_basis: torch.Tensor) -> torch.Tensor:
    """L1 (mean) of UUᵀT − T over the batch: T (D, N) the fake's normalised tokens per sample."""
    if fake_tokens.ndim != 3 or fake_tokens.shape[-1] != ref_basis.shape[0]:
        raise ValueError(f"fake_tokens must be (B, N, {ref_basis.shape[0]}), got {tuple(fake_tokens.shape)}")
    t = _token_matrix(fake_tokens)
    u = ref_basis.to(t.dtype)
    return (u @ (u.transpose(0, 1) @ t) - t).abs().mean()
