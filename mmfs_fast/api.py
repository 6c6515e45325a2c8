"""High-level API for embedding MMFS: load the models once, then stylize faces with a
style from a random seed, a text prompt, a reference image or an explicit w+.

    from mmfs_fast import MMFS
    mmfs = MMFS.load("mmfs_phase3.pt", clip_weights="ViT-B-32.pt")
    images = mmfs.stylize(["face1.jpg", "face2.png"], text="a watercolor portrait", output="pil")

Styles are batch-first w+ tensors (B, 10, style_dim); a style of batch 1 applies to
every face. Everything random in a call (the seed's z and the noise maps) comes from
``seed``, drawn on the CPU, so a seed gives the same result whatever the batch size.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from mmfs_fast import io
from mmfs_fast.engine import Engine, PlainRenderer
from mmfs_fast.loading import default_device, load_clip, load_stylizer
from mmfs_fast.precision import PRECISIONS, default_precision, precision_name
from mmfs_fast.models import N_LATENT, Stylizer, StylizerConfig
from mmfs_fast.models.noise import NOISE_MODES
from mmfs_fast.models.stylizer import z_from_seeds
from mmfs_fast.validation import check_faces, check_finite, check_seed, check_tensor

Style = torch.Tensor


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_seed(seed))


class MMFS:
    """A Stylizer plus (optionally) CLIP for text and reference-image styles.

    ``clip`` is anything with ``encode_text(list[str])``, ``encode_pil(list of PIL)``
    and ``encode_image(x in [-1, 1])`` returning (B, 512) embeddings, normally a
    :class:`mmfs_fast.encoders.CLIPEncoder`; :meth:`load` builds it. With an ``engine``
    it must be a CLIPEncoder: the engine computes the text and tensor-image styles with it.

    Every style and image comes from one renderer: the ``engine`` (whose prepared copy of the
    Stylizer computes the styles in fp32), else a :class:`~mmfs_fast.engine.PlainRenderer`
    over ``stylizer`` itself. ``check_finite`` (plain renderer; an engine has its own flag)
    makes :meth:`render` reject NaN/Inf inputs at the cost of a device→host sync.
    """

    def __init__(self, stylizer: Stylizer, clip=None, *, engine: Engine | None = None, random_clip: bool = False,
                 max_pixels: int | None = None, check_finite: bool = False):
        self.renderer = engine if engine is not None else PlainRenderer(stylizer, check_finite=check_finite)
        self.config = self.renderer.config
        if clip is not None:
            self.renderer.clip = clip
        self.max_pixels = max_pixels  # input images above it are rejected (None: see mmfs_fast.io)
        # a random CLIP is only for demos/tests, and large: build it on first use
        self._random_clip = random_clip and clip is None

    @classmethod
    def load(cls, ckpt=None, clip_weights=None, device=None, dtype=None, impl: str = "auto",
             random_init: bool = False, config: StylizerConfig | None = None, engine: bool = True,
             check_finite: bool = False, allow_cast: bool = False, trust_torchscript: bool = False) -> "MMFS":
        """Load a Stylizer checkpoint (official .pt/.pth, bare state dict, StyleGAN2 or our
        safetensors) and, for text/reference styles, CLIP weights (OpenAI ViT-B-32.pt).

        Rendering runs on :class:`mmfs_fast.engine.Engine` (prepared weights; CUDA graphs on
        GPUs) in ``dtype``: default float16 on CUDA, float32 on the CPU; bfloat16 works on
        both. Styles are computed in float32. ``engine=False`` renders with the plain
        Stylizer cast to ``dtype`` instead (the reference path).

        ``random_init=True`` builds whatever has no weights with random parameters (the
        Stylizer from ``config`` when ``ckpt`` is None; CLIP when ``clip_weights`` is None),
        with a loud warning: for demos and tests only. ``check_finite``: :meth:`render`
        rejects NaN/Inf inputs (one device→host sync per call). ``allow_cast``: cast integer or
        bool weights to float32 instead of refusing them. ``trust_torchscript``: accept CLIP
        weights that are a TorchScript archive (loading one runs its code).
        """
        device = torch.device(device) if device is not None else default_device()
        precision = precision_name(dtype) if dtype is not None else default_precision(device) if engine else "fp32"
        model_dtype = torch.float32 if engine else PRECISIONS[precision]  # the Engine keeps its own cast copy
        stylizer = load_stylizer(ckpt, device, model_dtype, impl, random_init, config, allow_cast)
        clip = load_clip(clip_weights, device, model_dtype, trust_torchscript) if clip_weights is not None else None
        fast = Engine(stylizer, clip, precision=precision, device=device, impl=impl,
                      check_finite=check_finite) if engine else None
        return cls(stylizer, clip, engine=fast, random_clip=random_init, check_finite=check_finite)

    # -- properties -------------------------------------------------------------
    @property
    def engine(self) -> Engine | None:
        """The Engine that renders, or None on the reference path (``engine=False``)."""
        return self.renderer if isinstance(self.renderer, Engine) else None

    @property
    def stylizer(self) -> Stylizer:
        """The model; with an engine, the engine's prepared copy (mapping network and
        clip_mapper in fp32, the rest in the engine's precision)."""
        return self.renderer.model

    @property
    def size(self) -> int:
        """Face resolution the model works at; inputs are resized to it."""
        return self.config.size

    @property
    def style_dim(self) -> int:
        return self.config.style_dim

    @property
    def device(self) -> torch.device:
        return self.renderer.device

    @property
    def dtype(self) -> torch.dtype:
        """Of the styles: float32 with an engine (which renders in its own precision), else the Stylizer's."""
        return self.renderer.style_dtype

    @property
    def clip(self):
        """The renderer's CLIP encoder (with ``random_clip``, built on first use)."""
        self._require_clip()
        return self.renderer.clip

    def _require_clip(self) -> None:
        if self.renderer.clip is None:
            if not self._random_clip:
                raise RuntimeError("text and reference-image styles need CLIP: "
                                   "MMFS.load(..., clip_weights='ViT-B-32.pt')")
            self.renderer.clip = load_clip(None, self.device, self.dtype)

    # -- styles -----------------------------------------------------------------
    def style_from_seed(self, seed: int | Sequence[int]) -> Style:
        """w+ (B, 10, style_dim) of z ~ N(0, I) drawn on the CPU from each seed."""
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        return self.renderer.style_from_z(z_from_seeds([check_seed(s) for s in seeds], self.style_dim))

    def style_from_text(self, text: str | Sequence[str]) -> Style:
        """w+ (B, 10, style_dim) of one prompt or a list of prompts, through CLIP and the clip_mapper."""
        texts = [text] if isinstance(text, str) else list(text)
        self._require_clip()
        return self.renderer.style_from_text(texts)

    def style_from_image(self, image) -> Style:
        """w+ (B, 10, style_dim) of reference images: a path, PIL image or numpy array (CLIP's
        standard preprocessing), a list of them, or a (B, 3, H, W) / (3, H, W) tensor in [-1, 1]."""
        self._require_clip()
        if isinstance(image, torch.Tensor):
            return self.renderer.style_from_image(image[None] if image.ndim == 3 else image)
        images = image if isinstance(image, (list, tuple)) else [image]
        with torch.no_grad():
            feats = self.clip.encode_pil([io.open_rgb(i, self.max_pixels) for i in images])
        return self.renderer.style_from_clip(feats)

    def style(self, seed: int | None = None, text: str | None = None, ref=None,
              w_plus: torch.Tensor | None = None) -> Style:
        """The w+ of one style source: text, ref or w_plus, else ``seed`` (random if None)."""
        given = [name for name, v in (("text", text), ("ref", ref), ("w_plus", w_plus)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one style source, got {' and '.join(given)}")
        if text is not None:
            return self.style_from_text(text)
        if ref is not None:
            return self.style_from_image(ref)
        if w_plus is not None:
            return self._check_w_plus(w_plus)
        return self.style_from_seed(random.randrange(2 ** 31) if seed is None else seed)

    def _check_w_plus(self, w_plus) -> Style:
        """(B, 10, D) or (10, D), checked on the host (no sync), on the device in the style dtype."""
        if isinstance(w_plus, torch.Tensor) and w_plus.ndim == 2:
            w_plus = w_plus[None]
        check_tensor("w_plus", w_plus, (None, N_LATENT, self.style_dim))
        return w_plus.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def mix(w_a: Style, w_b: Style, crossover: int) -> Style:
        """Style mixing: slots [0, crossover) from w_a, the rest from w_b (0 → all w_b,
        10 → all w_a). Coarse slots set the shape, fine ones the colours."""
        if not 0 <= crossover <= N_LATENT:
            raise ValueError(f"crossover must be in [0, {N_LATENT}], got {crossover}")
        if w_a.ndim != 3 or w_b.ndim != 3:
            raise ValueError(f"styles must be batch-first (B, {N_LATENT}, style_dim), "
                             f"got {tuple(w_a.shape)} and {tuple(w_b.shape)}")
        w_a, w_b = torch.broadcast_tensors(w_a, w_b)
        return torch.cat([w_a[:, :crossover], w_b[:, crossover:]], dim=1)

    @staticmethod
    def interpolate(w_a: Style, w_b: Style, t: float) -> Style:
        """Linear interpolation in w+: w_a at t = 0, w_b at t = 1 (other t extrapolate)."""
        return torch.lerp(w_a, w_b, float(t))

    # -- rendering ----------------------------------------------------------------
    def load_faces(self, images) -> torch.Tensor:
        """Paths, PIL images, numpy arrays or (3, size, size) tensors in [-1, 1] → (B, 3, size, size)."""
        return torch.stack([self._load_face(img).to(self.device) for img in images]).to(dtype=self.dtype)

    def _load_face(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.shape != (3, self.size, self.size) or not image.is_floating_point():
                raise ValueError(f"face tensors must be floating point (3, {self.size}, {self.size}) in [-1, 1], "
                                 f"got {image.dtype} {tuple(image.shape)}")
            # a check of host tensors reads no device; on the Engine a device tensor is checked
            # only with check_finite (Engine.stylize), to keep its path free of syncs
            if image.device.type == "cpu" or self.engine is None:
                check_faces(image)
            return image.float()
        return io.load_image(image, self.size, self.max_pixels)

    def random_noise(self, count: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Noise maps for ``count`` faces, drawn face by face on the CPU so that they do not
        depend on how the faces are batched."""
        per_face = [[torch.randn(1, 1, r, r, generator=generator) for r in self.stylizer.noise_resolutions]
                    for _ in range(count)]
        return [torch.cat(maps).to(device=self.device, dtype=self.dtype) for maps in zip(*per_face)]

    def _noise_maps(self, noise, count: int, generator: torch.Generator | None = None):
        """A drawn mode (models/noise.py's NOISE_MODES) as maps drawn on the CPU: "random" one
        set per face, "fixed" one set for them all; "zero" and explicit maps pass through."""
        if isinstance(noise, str) and noise in ("random", "fixed"):
            return self.random_noise(count if noise == "random" else 1, generator)
        return noise

    def render(self, faces: torch.Tensor, w_plus: Style, noise="random") -> torch.Tensor:
        """The batched step: faces (B, 3, size, size) in [-1, 1] + w+ (B or 1, 10, style_dim)
        → float32 images (B, 3, size, size) in [-1, 1], on the Engine when there is one.
        ``noise``: "random", "fixed", "zero" (see :data:`~mmfs_fast.models.noise.NOISE_MODES`)
        or one (B or 1, 1, r, r) map per conv (:meth:`random_noise`)."""
        w_plus = self._check_w_plus(w_plus).expand(faces.shape[0], -1, -1)
        return self.renderer.stylize(faces, w_plus, self._noise_maps(noise, faces.shape[0]))

    def stylize_iter(self, images, seed: int | None = None, text: str | None = None, ref=None,
                     w_plus: Style | None = None, noise: str = "random", batch_size: int = 8,
                     progress: bool = False, skip_errors: bool = False) -> Iterator[tuple[int, object]]:
        """Yield ``(index, image)`` in input order, one batch at a time; the image is a
        (3, size, size) CPU float tensor in [-1, 1]. With ``skip_errors`` an unreadable input
        yields ``(index, ImageError)`` instead and the others go on."""
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images to stylize")
        style = self.style(seed, text, ref, w_plus)
        if w_plus is not None:  # the images come back to the host anyway, so this read costs little
            check_finite(w_plus=w_plus)
        if style.shape[0] not in (1, len(images)):
            raise ValueError(f"{style.shape[0]} styles for {len(images)} images: give one style or one per image")
        generator = _seeded_generator(seed) if seed is not None else None
        if noise == "fixed":  # one draw for the whole call, whatever the batching
            noise = self.random_noise(1, generator)
        with tqdm(total=len(images), unit="img", disable=not progress) as bar:
            for start in range(0, len(images), batch_size):
                faces, results = {}, {}
                for index in range(start, min(start + batch_size, len(images))):
                    try:
                        faces[index] = self._load_face(images[index])
                    except io.ImageError as e:
                        if not skip_errors:
                            raise
                        results[index] = e
                if faces:
                    indices = list(faces)
                    w = style if style.shape[0] == 1 else style[indices]
                    out = self.render(torch.stack([f.to(self.device) for f in faces.values()]), w,
                                      self._noise_maps(noise, len(faces), generator))
                    results.update(zip(indices, out.cpu()))
                yield from sorted(results.items())
                bar.update(min(batch_size, len(images) - start))

    def stylize(self, images, seed: int | None = None, text: str | None = None, ref=None,
                w_plus: Style | None = None, noise: str = "random", batch_size: int = 8,
                progress: bool = False, output: str = "tensor"):
        """Stylize faces (paths, PIL images, numpy arrays or (3, size, size) tensors in [-1, 1],
        or one (N, 3, size, size) tensor) with one style: ``seed``, ``text``, ``ref`` (reference
        image) or ``w_plus``; with none of them a random seed. ``seed`` also seeds the noise
        maps of any style. ``noise``: "random" (one draw per face), "fixed" (one draw shared by
        every face) or "zero" (none).

        Returns a (N, 3, size, size) CPU tensor in [-1, 1], or a list of PIL images with
        ``output="pil"``. Unreadable inputs raise :class:`mmfs_fast.io.ImageError`.
        """
        if output not in ("tensor", "pil"):
            raise ValueError(f"output must be 'tensor' or 'pil', got {output!r}")
        results = [img for _, img in self.stylize_iter(images, seed, text, ref, w_plus, noise, batch_size,
                                                        progress)]
        return [io.to_pil(img) for img in results] if output == "pil" else torch.stack(results)
