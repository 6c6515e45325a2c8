"""CLIP scores: how well stylized faces match their prompt, as cosine similarity in CLIP space."""
from __future__ import annotations

import torch


def clip_target(clip, text: str | None = None, ref=None) -> torch.Tensor:
    """(1, 512) L2-normalised CLIP embedding of a text prompt or a reference image (path or PIL)."""
    if (text is None) == (ref is None):
        raise ValueError("give exactly one of text and ref")
    return clip.encode_text([text]) if text is not None else clip.encode_pil([ref])


def clip_score(clip, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) cosine between the CLIP embeddings of (B, 3, H, W) images in [-1, 1] and ``target``."""
    return (clip.encode_image(images) * target).sum(1)
