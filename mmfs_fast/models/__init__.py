"""Models: StyleGAN2 layers, the MMFS Stylizer, its Discriminator, the StyleGAN2 Generator
(Stage I teacher) and the CLIP mapper."""
from mmfs_fast.models.checkpoint import CheckpointError
from mmfs_fast.models.clip_mapper import CLIPMapper
from mmfs_fast.models.discriminator import Discriminator
from mmfs_fast.models.generator import Generator
from mmfs_fast.models.layers import set_fused_modconv, set_impl
from mmfs_fast.models.stylizer import N_LATENT, Stylizer, StylizerConfig

__all__ = ["Stylizer", "StylizerConfig", "Discriminator", "Generator", "CLIPMapper", "CheckpointError",
           "N_LATENT", "set_fused_modconv", "set_impl"]
