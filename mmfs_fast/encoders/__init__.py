"""Frozen pretrained encoders MMFS needs: CLIP ViT-B/32 (styles, directional and projection
losses) and DINO ViT-B/8 (structure loss). Weights come from local files; nothing is downloaded."""
from mmfs_fast.encoders._common import EncoderWeightsError
from mmfs_fast.encoders.clip import CLIPEncoder
from mmfs_fast.encoders.dino import DINOEncoder

__all__ = ["CLIPEncoder", "DINOEncoder", "EncoderWeightsError"]
