"""The plain Stylizer behind the Engine's rendering interface: the reference path of
``MMFS.load(engine=False)``. No prepared weights, graphs, buckets or caches: every style and
image comes straight from the model's own forward functions, in the model's dtype."""
from __future__ import annotations

import torch

from mmfs_fast.models.noise import NoiseSpec
from mmfs_fast.models.stylizer import N_LATENT, Stylizer
from mmfs_fast.validation import check_finite, check_tensor


class PlainRenderer:
    """What :class:`~mmfs_fast.api.MMFS` asks of a renderer (the Engine's names), over a
    plain Stylizer. ``clip``: anything with ``encode_text`` and ``encode_image`` returning
    (B, 512) embeddings. ``check_finite``: reject NaN/Inf inputs (one device→host sync a call)."""

    def __init__(self, stylizer: Stylizer, clip=None, check_finite: bool = False):
        self.model = stylizer.eval()
        self.config = stylizer.config
        self.clip = clip
        self.check_finite = check_finite

    @property
    def device(self) -> torch.device:
        return self.model.decoder0.conv.weight.device

    @property
    def style_dtype(self) -> torch.dtype:
        """The model's own dtype: the reference path computes styles and images in it."""
        return self.model.decoder0.conv.weight.dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.style_dtype)

    @torch.no_grad()
    def style_from_z(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.style_from_z(self._cast(z)).contiguous()

    @torch.no_grad()
    def style_from_clip(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.map_clip(self._cast(feats))

    @torch.no_grad()
    def style_from_text(self, texts: list[str]) -> torch.Tensor:
        return self.style_from_clip(self.clip.encode_text(texts))

    @torch.no_grad()
    def style_from_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.style_from_clip(self.clip.encode_image(images.to(self.device)))

    @torch.no_grad()
    def stylize(self, faces: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        size = self.config.size
        check_tensor("faces", faces, (None, 3, size, size))
        check_tensor("w_plus", w_plus, (faces.shape[0], N_LATENT, self.config.style_dim))
        faces, w_plus = self._cast(faces), self._cast(w_plus)
        if self.check_finite:
            check_finite(faces=faces, w_plus=w_plus)
        return self.model(faces, w_plus=w_plus, noise=noise).float()
