"""The inference engine: the Stylizer prepared once for fast, predictable serving.

``Engine`` wraps a :class:`~mmfs_fast.models.stylizer.Stylizer` (and optionally a
:class:`~mmfs_fast.encoders.CLIPEncoder`) and adds

- low precision (fp16/bf16) that cannot overflow: the layers' inference forms
  (:mod:`mmfs_fast.models.inference`) compute style affines and demodulation in fp32;
- weights prepared once at load, never on every call; activations in place;
- static shapes (:mod:`.executor`): batch-size buckets, CUDA graphs or torch.compile;
- LRU caches of w+ per text prompt and per caller-given reference-image key (:mod:`.cache`);
- ``submit()``: thread-safe micro-batching of single requests (:mod:`.batcher`).

Inputs are checked on the host (shapes, dtypes) without a device→host sync;
``check_finite=True`` also rejects NaN/Inf inputs, at the cost of one sync per call.

Noise: graphs need static inputs, so the engine's default is ``noise="zero"`` (no
noise, deterministic). ``noise="random"`` draws fresh N(0, 1) maps on every call
outside the graph and copies them into the graph's static noise inputs.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Hashable, Sequence

import torch

from mmfs_fast import precision as precisions
from mmfs_fast.engine.batcher import Batcher
from mmfs_fast.engine.cache import LRUCache, cached_styles
from mmfs_fast.engine.executor import DEFAULT_BUCKETS, Executor, cudnn_benchmark, parse_buckets
from mmfs_fast.engine.memory import retain_freed_cpu_memory
from mmfs_fast.models.inference import InferenceStylizer, prepare_stylizer
from mmfs_fast.models.noise import NoiseSpec, make_noises
from mmfs_fast.models.stylizer import N_LATENT, Stylizer, z_from_seeds
from mmfs_fast.validation import check_finite, check_seed, check_tensor


class Engine:
    """Fast stylization with a prepared Stylizer (see the module docstring).

    Args:
        stylizer: the model; the engine keeps its own prepared copy.
        clip: a CLIPEncoder on the same device, for text and reference-image styles.
        precision: "fp16", "bf16" or "fp32" (see :mod:`mmfs_fast.precision`); default fp16
            on CUDA, fp32 on CPU (where fp16 is not offered).
        device: default CUDA when available, else CPU.
        cuda_graphs: capture and replay CUDA graphs per bucket (CUDA only).
        buckets: batch sizes runs are padded to; "auto" is (1, 2, 4, 8, 16, 32) where
            static shapes pay (CUDA graphs, compile) and no padding otherwise; None: no padding.
        style_cache_size: entries of each of the text and reference-image w+ caches.
        impl: op backend ("auto", "ref", "cuda", "triton").
        channels_last: keep weights and activations in NHWC (default): oneDNN's convolutions are
            faster in it on the CPU, and on CUDA cuDNN's fp16/bf16 tensor-core kernels are NHWC, so
            NCHW activations would be transposed around every convolution (bench/cost_model.py; bench
            config mmfs-fast-nchw measures the other layout).
        cudnn_benchmark: let cuDNN time its algorithms for each new shape (once, while warming
            up: the engine's shapes are static) instead of choosing them by heuristics; set only
            around the engine's own runs.
        compile: run through ``torch.compile(mode="max-autotune")`` instead of hand-captured graphs.
        max_batch, max_wait_ms: micro-batching of ``submit()``: a batch runs when it has
            max_batch requests or max_wait_ms after its first request arrived.
        graph_memory_limit: bytes of reserved CUDA memory above which no new graph is
            captured (those batch sizes then run eagerly).
        retain_cpu_memory: on the CPU, call :func:`~mmfs_fast.engine.retain_freed_cpu_memory`
            (freed memory stays in the process for reuse).
        check_finite: reject inputs holding NaN or Inf (one device→host sync per call).
        upsample_form: the decoder's upsampling convolutions as "transposed" conv + blur, as
            "polyphase" convolutions (the blur folded in), or "auto": per shape from winners.json
            on CUDA, transposed on the CPU (README "Upsampling").
        downsample_form: the encoder's downsampling convolutions as the "blurred" blur + strided
            conv, as "folded" (the blur folded into the strided kernel), or "auto": per shape from
            winners.json on CUDA, blurred on the CPU.
        stem_form: the encoder's first convolution (on the RGB face) as the "separate"
            convolution + bias/activation pass, as "fused" (the stem_conv op: one pass), or
            "auto": from winners.json on CUDA, separate on the CPU.
    """

    def __init__(self, stylizer: Stylizer, clip=None, precision: str | None = None, device=None,
                 cuda_graphs: bool = True, buckets: Sequence[int] | str | None = "auto",
                 style_cache_size: int = 256, impl: str = "auto",
                 channels_last: bool | None = None, cudnn_benchmark: bool = True, compile: bool = False,
                 max_batch: int | None = None, max_wait_ms: float = 2.0, graph_memory_limit: int | None = None,
                 retain_cpu_memory: bool = True, check_finite: bool = False, upsample_form: str = "auto",
                 downsample_form: str = "auto", stem_form: str = "auto"):
        if not isinstance(stylizer, Stylizer) or isinstance(stylizer, InferenceStylizer):
            got = "an Engine's prepared model" if isinstance(stylizer, Stylizer) else type(stylizer).__name__
            raise TypeError(f"stylizer must be a mmfs_fast Stylizer (the trained model), got {got}")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = self.device.type == "cuda"
        if precision is None:
            precision = precisions.default_precision(self.device)
        if precision not in precisions.PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(precisions.PRECISIONS)}, got {precision!r}")
        precisions.check_supported(precision, self.device)
        if clip is not None and torch.device(clip.device).type != self.device.type:
            raise ValueError(f"the CLIP encoder is on {clip.device} but the engine runs on {self.device}")
        self.precision, self.dtype = precision, precisions.PRECISIONS[precision]
        if retain_cpu_memory and not on_cuda:
            retain_freed_cpu_memory()
        self.config = stylizer.config
        self.clip = clip
        self.check_finite = check_finite
        self.memory_format = torch.contiguous_format if channels_last is False else torch.channels_last
        self.model = prepare_stylizer(stylizer, self.dtype, impl, conv_adds_bias=not on_cuda,
                                      upsample_form=upsample_form, downsample_form=downsample_form,
                                      stem_form=stem_form).to(self.device, memory_format=self.memory_format)
        self.cudnn_benchmark = cudnn_benchmark

        mode = "compile" if compile else "graph" if cuda_graphs and on_cuda else "eager"
        buckets = parse_buckets(buckets, mode)
        self._executor = Executor(self.device, buckets, mode, graph_memory_limit)
        wrap = (lambda f: torch.compile(f, mode="max-autotune", dynamic=False)) if compile else (lambda f: f)
        self._encode_fn = wrap(self.model.encoder)
        self._decode_fn = wrap(self._decode_graph)
        self._stylize_fn = wrap(self._styled_render(lambda w_plus: w_plus))
        self._image_style_fn = wrap(self._image_style_graph)
        self._text_style_fn = wrap(self._text_style_graph)
        self._seed_stylize_fn = wrap(self._styled_render(self._seed_style_graph))
        self._image_stylize_fn = wrap(self._styled_render(self._image_style_graph))
        self._text_stylize_fn = wrap(self._styled_render(self._text_style_graph))

        self.text_cache = LRUCache(style_cache_size)
        self.image_cache = LRUCache(style_cache_size)
        self._batcher = Batcher(self, max_batch or (buckets[-1] if buckets else DEFAULT_BUCKETS[-1]), max_wait_ms)

    #: styles stay in fp32 whatever the render precision: fp16 styles can overflow the demodulation
    style_dtype = torch.float32

    @property
    def buckets(self) -> tuple[int, ...] | None:
        return self._executor.buckets

    @property
    def max_batch(self) -> int:
        return self._batcher.max_batch

    @property
    def max_wait_ms(self) -> float:
        return self._batcher.max_wait_ms

    # -- the captured functions (tensors in, tensor out; no host syncs) --------------------
    def _decode_graph(self, feat: torch.Tensor, w_plus: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        return self.model.synthesize(feat, w_plus, list(noises) or None).clamp(-1, 1)

    def _image_style_graph(self, pixels: torch.Tensor) -> torch.Tensor:
        # the clip_mapper L2-normalises the embedding itself, in fp32 from CLIP's dtype
        return self.model.clip_mapper(self.clip.model.encode_image(pixels))

    def _text_style_graph(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.clip_mapper(self.clip.model.encode_text(tokens))

    def _seed_style_graph(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.mapping_z(z)[:, None].expand(-1, N_LATENT, -1)

    def _styled_render(self, style: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The captured function (faces, style input, *noises) → image: the w+ ``style(input)`` and
        its style table (small kernels) beside the encoder (big ones), then the decoder; with the
        mapping network or CLIP and the clip_mapper as style, one graph and no w+ between two."""
        def render(faces: torch.Tensor, style_input: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
            table, feat = self._executor.side_by_side(lambda: self.model.style_table(style(style_input)),
                                                      lambda: self.model.encoder(faces))
            return self.model.render(feat, table, list(noises)).clamp(-1, 1)
        return render

    def _run(self, name: str, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        with self._executor.lock, cudnn_benchmark(self.cudnn_benchmark):
            return self._executor.run(name, fn, *inputs)

    # -- input checks ----------------------------------------------------------------------
    def _finite(self, **tensors: torch.Tensor) -> None:
        if self.check_finite:
            check_finite(**tensors)

    def _faces(self, faces: torch.Tensor) -> torch.Tensor:
        size = self.config.size
        check_tensor("faces", faces, (None, 3, size, size))
        return faces.to(self.device, self.dtype, memory_format=self.memory_format)

    def check_w_plus(self, w_plus: torch.Tensor, batch: int) -> torch.Tensor:
        """``w_plus`` checked as (batch, 10, D) (and finite with ``check_finite``), in fp32 on the device."""
        check_tensor("w_plus", w_plus, (batch, N_LATENT, self.config.style_dim))
        self._finite(w_plus=w_plus)
        return w_plus.to(self.device, torch.float32)

    def _noises(self, noise: NoiseSpec, batch: int) -> list[torch.Tensor]:
        """The noise inputs of a run: none for "zero", else one (B, 1, r, r) map per conv."""
        noises = make_noises(noise, batch, self.model.noise_resolutions, self.device, self.dtype)
        return [] if noises[0] is None else [n.expand(batch, -1, -1, -1) for n in noises]

    # -- public API ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, faces: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) faces in [-1, 1] → encoder features (B, 8·ngf, S/16, S/16) in the engine dtype."""
        faces = self._faces(faces)
        self._finite(faces=faces)
        return self._run("encode", self._encode_fn, faces)

    @torch.inference_mode()
    def decode(self, feats: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """Encoder features + (B, 10, D) w+ → float32 images in [-1, 1]."""
        r = self.model.feature_size
        check_tensor("feats", feats, (None, self.model.feature_channels, r, r))
        feats = feats.to(self.device, self.dtype, memory_format=self.memory_format)
        self._finite(feats=feats)
        w_plus = self.check_w_plus(w_plus, feats.shape[0])
        return self._run("decode", self._decode_fn, feats, w_plus, *self._noises(noise, feats.shape[0]))

    @torch.inference_mode()
    def stylize(self, faces: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """(B, 3, S, S) faces in [-1, 1] in the style (B, 10, D) w+ → float32 images in [-1, 1].

        noise: "zero" (no noise), "random" (fresh N(0, 1) maps from torch's RNG) or
        explicit maps, one (B or 1, 1, r, r) tensor per conv layer (Stylizer.noise_resolutions).
        """
        check_tensor("faces", faces, (None, 3, self.config.size, self.config.size))
        check_tensor("w_plus", w_plus, (faces.shape[0], N_LATENT, self.config.style_dim))
        faces, w_plus = self._faces(faces), w_plus.to(self.device, torch.float32)
        self._finite(faces=faces, w_plus=w_plus)
        return self._run("stylize", self._stylize_fn, faces, w_plus, *self._noises(noise, faces.shape[0]))

    def _stylize_with(self, name: str, fn: Callable, faces: torch.Tensor, style: torch.Tensor,
                      noise: NoiseSpec) -> torch.Tensor:
        faces = self._faces(faces)
        self._finite(faces=faces)
        return self._run(name, fn, faces, style, *self._noises(noise, faces.shape[0]))

    @torch.inference_mode()
    def stylize_seed(self, faces: torch.Tensor, seeds: int | Sequence[int], noise: NoiseSpec = "zero") -> torch.Tensor:
        """``stylize(faces, style_from_seed(seeds))`` as one graph (mapping network and render)."""
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        return self.stylize_z(faces, self._seed_z(seeds), noise)

    @torch.inference_mode()
    def stylize_z(self, faces: torch.Tensor, z: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """``stylize(faces, style_from_z(z))`` as one graph (mapping network and render)."""
        check_tensor("faces", faces, (None, 3, self.config.size, self.config.size))
        check_tensor("z", z, (faces.shape[0], self.config.style_dim))
        z = z.to(self.device, torch.float32)
        self._finite(z=z)
        return self._stylize_with("seed_stylize", self._seed_stylize_fn, faces, z, noise)

    @torch.inference_mode()
    def stylize_text(self, faces: torch.Tensor, texts: str | Sequence[str], noise: NoiseSpec = "zero") -> torch.Tensor:
        """``stylize(faces, style_from_text(texts))`` as one graph (CLIP text tower, clip_mapper and
        render); one prompt per face, or one for all. The style caches are not consulted."""
        check_tensor("faces", faces, (None, 3, self.config.size, self.config.size))
        texts = self._prompts(texts)
        if len(texts) == 1:
            texts = texts * faces.shape[0]
        if len(texts) != faces.shape[0]:
            raise ValueError(f"stylize_text: {len(texts)} prompts for {faces.shape[0]} faces")
        self._check_clip()
        tokens = self.clip.tokenizer(texts).to(self.device)
        return self._stylize_with("text_stylize", self._text_stylize_fn, faces, tokens, noise)

    @torch.inference_mode()
    def stylize_image(self, faces: torch.Tensor, images: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """``stylize(faces, style_from_image(images))`` as one graph (CLIP image tower, clip_mapper
        and render); one reference image (B, 3, H, W) in [-1, 1] per face. Not cached."""
        check_tensor("faces", faces, (None, 3, self.config.size, self.config.size))
        check_tensor("images", images, (faces.shape[0], 3, None, None))
        self._check_clip()
        images = images.to(self.device)
        self._finite(images=images)
        return self._stylize_with("image_stylize", self._image_stylize_fn, faces, self.clip.preprocess(images), noise)

    @torch.inference_mode()
    def style_from_seed(self, seeds: int | Sequence[int]) -> torch.Tensor:
        """w+ (B, 10, D) of seeds: z from :func:`~mmfs_fast.models.stylizer.z_from_seeds`, mapped
        and repeated over the 10 slots."""
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        return self.style_from_z(self._seed_z(seeds))

    def _seed_z(self, seeds: list) -> torch.Tensor:
        if not seeds:
            raise ValueError("style_from_seed needs at least one seed")
        return z_from_seeds([check_seed(s) for s in seeds], self.config.style_dim)

    @torch.inference_mode()
    def style_from_z(self, z: torch.Tensor) -> torch.Tensor:
        """w+ (B, 10, D) of (B, D) latents z: mapped in fp32 and repeated over the 10 slots."""
        check_tensor("z", z, (None, self.config.style_dim))
        z = z.to(self.device, torch.float32)
        self._finite(z=z)
        return self.model.mapping_z(z)[:, None].repeat(1, N_LATENT, 1)

    @torch.inference_mode()
    def style_from_clip(self, feats: torch.Tensor) -> torch.Tensor:
        """w+ (B, 10, D) of (B, D) CLIP embeddings (e.g. of reference images preprocessed on
        the host) through the fp32 clip_mapper."""
        self._check_clip_mapper()
        check_tensor("clip_feats", feats, (None, self.config.style_dim))
        feats = feats.to(self.device, torch.float32)
        self._finite(clip_feats=feats)
        return self.model.clip_mapper(feats)

    @torch.inference_mode()
    def style_from_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """w+ (B, 10, D) of text prompts through CLIP and the clip_mapper (LRU-cached per prompt)."""
        texts = self._prompts(texts)
        self._check_clip()
        return cached_styles(self.text_cache, texts, texts, lambda todo: self._run(
            "text_style", self._text_style_fn, self.clip.tokenizer(todo).to(self.device)))

    @torch.inference_mode()
    def style_from_image(self, images: torch.Tensor, keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """w+ (B, 10, D) of (B, 3, H, W) reference images in [-1, 1] through CLIP and the
        clip_mapper. ``keys``: one per image (e.g. a hash of the file it came from); with
        them the w+ are LRU-cached per key, without them computed every time (hashing the
        pixels would copy them back from the device)."""
        check_tensor("images", images, (None, 3, None, None))
        if keys is not None and len(keys) != images.shape[0]:
            raise ValueError(f"style_from_image: {len(keys)} keys for {images.shape[0]} images")
        self._check_clip()
        images = images.to(self.device)
        self._finite(images=images)
        # one batched resize on the device
        pixels = self.clip.preprocess(images)
        if keys is None or self.image_cache.capacity == 0:
            return self._run("image_style", self._image_style_fn, pixels)
        return cached_styles(self.image_cache, list(keys), list(pixels), lambda todo: self._run(
            "image_style", self._image_style_fn, torch.stack(todo)))

    @staticmethod
    def _prompts(texts: str | Sequence[str]) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text prompts must be non-empty strings, got {t!r}")
        if not texts:
            raise ValueError("style_from_text needs at least one prompt")
        return texts

    def _check_clip(self) -> None:
        if self.clip is None:
            raise RuntimeError("text and reference-image styles need a CLIP encoder: "
                               "Engine(stylizer, clip=CLIPEncoder(...))")
        self._check_clip_mapper()

    def _check_clip_mapper(self) -> None:
        if self.model.clip_mapper is None:
            raise RuntimeError("this Stylizer has no clip_mapper (phase 1/2 checkpoint): text and reference "
                               "styles need a phase 3/4 checkpoint")

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture (or compile) the stylization, and the CLIP styles when a CLIP encoder is
        given, for every bucket now instead of on first use."""
        size, dim = self.config.size, self.config.style_dim
        for batch in self.buckets or (1,):
            self.stylize(torch.zeros(batch, 3, size, size), torch.zeros(batch, N_LATENT, dim))
            if self.clip is not None and self.model.clip_mapper is not None:
                self._run("image_style", self._image_style_fn,
                          self.clip.preprocess(torch.zeros(batch, 3, size, size, device=self.device)))
                self._run("text_style", self._text_style_fn, self.clip.tokenizer(["a"] * batch).to(self.device))

    def memory_stats(self) -> dict:
        """Captured graphs, their static buffers, CUDA memory and the style caches."""
        ex = self._executor
        stats = {"mode": ex.mode, "buckets": ex.buckets, "graphs": sorted(key[:2] for key in ex.graphs),
                 "graph_static_bytes": ex.static_bytes(), "eager_fallbacks": sorted(ex.failed),
                 "text_cache": self.text_cache.stats(), "image_cache": self.image_cache.stats()}
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            stats["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats

    def release_graphs(self) -> None:
        """Free every captured graph and its memory pool (they are captured again on use)."""
        self._executor.release()

    # -- micro-batching --------------------------------------------------------------------
    def submit(self, face: torch.Tensor, style, noise: str = "zero", style_key: Hashable | None = None) -> Future:
        """Queue one (3, S, S) face for stylization; returns a Future of the (3, S, S) image.

        style: a seed (int), a text prompt (str), a reference image ((3, H, W) tensor in
        [-1, 1]) or a w+ ((10, D) tensor). style_key: a reference image's cache key (see
        :meth:`style_from_image`). Requests arriving within ``max_wait_ms`` run as one
        batch; a bad request fails only its own Future.
        """
        return self._batcher.submit(face, style, noise, style_key)

    def queue_stats(self) -> dict:
        """Requests waiting for a micro-batch, and how many micro-batches of each size ran."""
        return self._batcher.stats()

    def close(self) -> None:
        """Finish every submitted request, then stop the batching thread."""
        self._batcher.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
