"""The inference engine: the Stylizer prepared once for fast, predictable serving.

``Engine`` wraps a :class:`~mmfs_fast.models.stylizer.Stylizer` (and optionally a
:class:`~mmfs_fast.encoders.CLIPEncoder`) and adds

- low precision (fp16/bf16) that cannot overflow: style affines and demodulation
  coefficients are computed in fp32, only activations and conv weights are cast;
- weights prepared once at load (equalized-lr scales, activation gains and biases folded
  in, cast, FIR buffers on the device), never on every call; activations in place;
- batch-size buckets: a batch is padded to the next bucket size (split above the
  largest), so shapes are static; on CUDA each (function, bucket) pair is captured
  once as a CUDA graph and replayed, all graphs sharing one memory pool;
  ``compile=True`` uses ``torch.compile(mode="max-autotune")`` instead;
- LRU caches of w+ per text prompt and per reference image;
- ``submit()``: thread-safe micro-batching of single requests into one run.

Noise: graphs need static inputs, so the engine's default is ``noise="zero"`` (no
noise, deterministic). ``noise="random"`` draws fresh N(0, 1) maps on every call
outside the graph and copies them into the graph's static noise inputs.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import math
import platform
import threading
import time
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.models.noise import NoiseSpec, make_noises
from mmfs_fast.models.layers import (ConvLayer, EqualLinear, FusedLeakyReLU, ModulatedConv2d, ResBlock, StyledConv,
                                     shared_weight_conv, synthesize)
from mmfs_fast.models.stylizer import N_LATENT, N_UPSAMPLINGS, Stylizer, z_from_seeds
from mmfs_fast.ops import bias_act, default_fir, modulated_conv2d
from mmfs_fast.ops.bias_act import ACTIVATIONS
from mmfs_fast.ops.modulated_conv2d import DEMOD_EPS

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
LRELU = ACTIVATIONS["lrelu"]  # StyleGAN2's leaky ReLU: slope 0.2, gain sqrt(2)
NOISE_MODES = ("zero", "random")  # of submit(); the direct calls also take explicit maps


# -- the Stylizer prepared for inference --------------------------------------------------

class _Linear(nn.Module):
    """EqualLinear with its learning-rate scales folded in, in fp32 (styles stay fp32)."""

    def __init__(self, layer: EqualLinear):
        super().__init__()
        self.register_buffer("weight", (layer.weight * layer.scale).detach().float())
        bias = None if layer.bias is None else (layer.bias * layer.lr_mul).detach().float()
        self.register_buffer("bias", bias)
        self.activation = layer.activation
        self.impl = layer.impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return bias_act(F.linear(x, self.weight), self.bias, act="lrelu", impl=self.impl)
        return F.linear(x, self.weight, self.bias)


def _conv_layer(layer: ConvLayer, dtype: torch.dtype, conv_adds_bias: bool, out_scale: float = 1.0) -> nn.Sequential:
    """ConvLayer ([Blur] → EqualConv2d → [FusedLeakyReLU]) as [Blur] → Conv2d → bias and
    leaky ReLU in one pass, its output times ``out_scale`` (> 0).

    The activation's gain moves into weight and bias: lrelu(z)·g = lrelu(g·z) for g > 0.
    conv_adds_bias: the convolution adds the bias, then an in-place leaky ReLU (oneDNN adds it
    in its own epilogue, so on the CPU one pass over the output instead of three; measured with
    _StyledConv); otherwise the bias_act op adds it (on CUDA one kernel, where PyTorch adds a
    cuDNN convolution's bias in a pass of its own).
    """
    *blurs, equal_conv = [m for m in layer if not isinstance(m, FusedLeakyReLU)]
    activation = layer[-1] if isinstance(layer[-1], FusedLeakyReLU) else None
    gain = out_scale * (LRELU.default_gain if activation is not None else 1.0)
    bias = activation.bias if activation is not None else equal_conv.bias
    bias = None if bias is None else (bias * gain).detach().to(dtype)
    out_ch, in_ch, k, _ = equal_conv.weight.shape
    conv = nn.Conv2d(in_ch, out_ch, k, equal_conv.stride, equal_conv.padding,
                     bias=bias is not None and conv_adds_bias, device=equal_conv.weight.device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(equal_conv.weight * (equal_conv.scale * gain))
        if conv.bias is not None:
            conv.bias.copy_(bias)
    modules = [copy.deepcopy(blur).to(dtype=dtype) for blur in blurs] + [conv.requires_grad_(False)]
    if activation is not None:
        modules.append(nn.LeakyReLU(LRELU.default_alpha, inplace=True) if conv_adds_bias else _BiasLeakyReLU(bias))
    return nn.Sequential(*modules)


class _BiasLeakyReLU(nn.Module):
    """leaky_relu(x + bias) through the bias_act op, the gain already folded into x and bias."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, act="lrelu", gain=1.0, impl=self.impl)


class _ResBlock(nn.Module):
    """ResBlock with its 1/sqrt(2) folded into the last layers of both branches (see
    _conv_layer), so one in-place add joins them."""

    def __init__(self, block: ResBlock, dtype: torch.dtype, conv_adds_bias: bool):
        super().__init__()
        self.conv1 = _conv_layer(block.conv1, dtype, conv_adds_bias)
        self.conv2 = _conv_layer(block.conv2, dtype, conv_adds_bias, out_scale=1 / math.sqrt(2))
        self.skip = _conv_layer(block.skip, dtype, conv_adds_bias, out_scale=1 / math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)).add_(self.skip(x))


class _ModulatedConv(nn.Module):
    """ModulatedConv2d safe in fp16: the style affine and the demodulation coefficients
    are computed in fp32 and only the convolution runs in the activation dtype.

    Demodulated layers are pre-normalised as in NVlabs' stylegan3: each output
    channel's weights to max |W| = 1/sqrt(fan_in), each sample's styles to max |s| = 1.
    Demodulation cancels both scales exactly, and every fp16 product W·s stays ≤ 1.

    fused: the modulated_conv2d op (per-sample weights); otherwise StyleGAN2's unfused
    form, :func:`~mmfs_fast.models.layers.shared_weight_conv`.
    """

    def __init__(self, layer: ModulatedConv2d, dtype: torch.dtype, fused: bool):
        super().__init__()
        weight = (layer.weight[0] * layer.scale).detach().float()
        self.demodulate = layer.demodulate
        if self.demodulate:
            weight = weight * (layer.scale / weight.abs().amax(dim=(1, 2, 3), keepdim=True))
        self.register_buffer("weight", weight.to(dtype))
        # demodulation normalises exactly the weights the convolution applies
        self.register_buffer("weight_sq", self.weight.float().square().sum(dim=(2, 3)))
        self.affine = _Linear(layer.modulation)
        self.up = 2 if layer.upsample else 1
        self.fused = fused
        if fused:
            # the op takes the unit-sum FIR; a device buffer keeps the call free of host→device copies
            fir = layer.blur.kernel / 4 if layer.upsample else default_fir(weight.device)
            self.register_buffer("fir", fir.detach().to(dtype))
        elif layer.upsample:
            # the layer's own blur after the transposed convolution (FIR ×4 and its pads)
            self.register_buffer("blur_kernel", layer.blur.kernel.detach().to(dtype))
            self.blur_pad = layer.blur.pad
        self.impl = layer.impl

    def undemodulated(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution's output before demodulation and the (B, O) fp32 demodulation
        coefficients (None for a layer without demodulation)."""
        styles = self.affine(w.float())
        demod = None
        if self.demodulate:
            styles = styles / styles.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            demod = torch.rsqrt(styles.square() @ self.weight_sq.T + DEMOD_EPS)
        if self.fused:
            out = modulated_conv2d(x, self.weight, styles.to(x.dtype), demodulate=False, up=self.up, fir=self.fir,
                                   impl=self.impl)
        else:
            up_blur = (self.blur_kernel, self.blur_pad) if self.up == 2 else None
            out = shared_weight_conv(x, styles, self.weight, up_blur, self.impl)
        return out, demod

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out, demod = self.undemodulated(x, w)
        return out if demod is None else out * demod.to(out.dtype)[:, :, None, None]


class _StyledConv(nn.Module):
    """StyledConv (modulated conv → noise → fused leaky ReLU) with its epilogue in two passes
    instead of four: demodulation, bias and the activation's gain in one addcmul
    (lrelu(z)·g = lrelu(g·z) for g > 0), the noise added in place, then an in-place leaky ReLU.
    With _conv_layer and _ResBlock, the 512² guided stylization on 2 CPU cores (AMD EPYC,
    batch 1) went 1.56 → 1.16 s in fp32 and 0.69 → 0.52 s in bf16. On a GPU the passes are as
    many as before (the cuda bias_act kernel fused its three already), the launches fewer."""

    def __init__(self, layer: StyledConv, dtype: torch.dtype, fused: bool):
        super().__init__()
        self.conv = _ModulatedConv(layer.conv, dtype, fused)
        gain = LRELU.default_gain
        self.register_buffer("bias", (layer.activate.bias * gain).detach().to(dtype)[None, :, None, None])
        self.noise_strength = layer.noise.weight.item() * gain  # a constant: the weights are frozen

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out, demod = self.conv.undemodulated(x, w)
        out = torch.addcmul(self.bias, out, (demod * LRELU.default_gain).to(out.dtype)[:, :, None, None])
        if noise is not None:
            out.add_(noise, alpha=self.noise_strength)
        return F.leaky_relu_(out, LRELU.default_alpha)


def prepare_stylizer(stylizer: Stylizer, dtype: torch.dtype, impl: str, fused_modconv: bool = False,
                     conv_adds_bias: bool = True) -> Stylizer:
    """A frozen copy of ``stylizer`` for inference in ``dtype``: encoder and decoder
    activations in ``dtype``; mapping network, style affines and clip_mapper in fp32.
    fused_modconv: see :class:`_ModulatedConv`; conv_adds_bias: see :func:`_conv_layer`
    (the Engine's choice: True on the CPU, False on CUDA)."""
    model = copy.deepcopy(stylizer).eval().requires_grad_(False)
    for name, child in model.named_children():
        child.to(dtype=dtype if name not in ("mapping_z", "clip_mapper") else torch.float32)
    # rebuilt from the caller's modules, so they read the weights before any cast
    replaced: list[str] = []
    for name, source in stylizer.named_modules():
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a module rebuilt as a whole
        if isinstance(source, EqualLinear):
            prepared = _Linear(source)
        elif isinstance(source, ConvLayer):
            prepared = _conv_layer(source, dtype, conv_adds_bias)
        elif isinstance(source, ResBlock):
            prepared = _ResBlock(source, dtype, conv_adds_bias)
        elif isinstance(source, StyledConv):
            prepared = _StyledConv(source, dtype, fused_modconv)
        elif isinstance(source, ModulatedConv2d):  # ToRGB's
            prepared = _ModulatedConv(source, dtype, fused_modconv)
        else:
            continue
        replaced.append(name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, prepared)
    model.set_impl(impl)
    return model


# -- static-shape execution: buckets, CUDA graphs, torch.compile ----------------------------

@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]
    output: torch.Tensor


class _Executor:
    """Runs batch functions at bucketed batch sizes: eagerly, compiled, or as CUDA graphs
    captured per (function, bucket, input shapes) and replayed.

    Every row of every function is independent of the others, so padding rows (zeros, or
    whatever an earlier replay left in a static buffer: always finite, inputs are
    validated) never change the real rows. All graphs share one memory pool, so the
    workspace is that of the largest capture: a graph's static output may sit in memory
    another graph's replay writes to, which is harmless because replays are serialised by
    ``lock`` and each output is copied out right after its replay.
    """

    def __init__(self, device: torch.device, buckets: tuple[int, ...] | None, mode: str,
                 graph_memory_limit: int | None):
        self.device, self.buckets, self.mode = device, buckets, mode
        self.graph_memory_limit = graph_memory_limit
        self.lock = threading.RLock()
        self.pool = torch.cuda.graph_pool_handle() if mode == "graph" else None
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: set[str] = set()

    def run(self, name: str, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) for inputs sharing batch size B, in chunks of at most the largest bucket."""
        batch = inputs[0].shape[0]
        if self.buckets is None:
            return self._call(fn, inputs)
        step = self.buckets[-1]
        chunks = [self._run_bucket(name, fn, [x[i:i + step] for x in inputs]) for i in range(0, batch, step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run_bucket(self, name: str, fn: Callable, inputs: list[torch.Tensor]) -> torch.Tensor:
        n = inputs[0].shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        if self.mode == "graph" and name not in self.failed:
            graph = self._graph(name, fn, bucket, inputs)
            if graph is not None:
                for static, x in zip(graph.inputs, inputs):
                    static[:n].copy_(x)
                graph.graph.replay()
                return graph.output[:n].clone()
        padded = [torch.cat([x, x.new_zeros((bucket - n, *x.shape[1:]))]) if bucket > n else x for x in inputs]
        return self._call(fn, padded)[:n]

    def _call(self, fn: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = fn(*inputs)
        # torch.compile's own CUDA graphs (cudagraph trees) overwrite their outputs on the next call
        return out.clone() if self.mode == "compile" else out

    def _graph(self, name: str, fn: Callable, bucket: int, inputs: list[torch.Tensor]) -> _Graph | None:
        key = (name, bucket, *((tuple(x.shape[1:]), x.dtype) for x in inputs))
        if key in self.graphs:
            return self.graphs[key]
        if self.graph_memory_limit is not None and torch.cuda.memory_reserved(self.device) > self.graph_memory_limit:
            warnings.warn(f"mmfs_fast.Engine: graph_memory_limit reached; {name} at batch {bucket} runs eagerly",
                          RuntimeWarning, stacklevel=4)
            return None
        static = [x.new_zeros((bucket, *x.shape[1:])) for x in inputs]
        try:
            # warm-up runs on a side stream (cuDNN autotuning, Triton JIT) before the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (callers' own models) may go on during the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = fn(*static)
        except RuntimeError as e:
            warnings.warn(f"mmfs_fast.Engine: cannot capture {name} as a CUDA graph, it runs eagerly: {e}",
                          RuntimeWarning, stacklevel=4)
            self.failed.add(name)
            return None
        self.graphs[key] = _Graph(graph, static, output)
        return self.graphs[key]

    def static_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.graphs.values() for t in (*g.inputs, g.output))

    def release(self) -> None:
        with self.lock:
            self.graphs.clear()
            self.failed.clear()
            self.pool = torch.cuda.graph_pool_handle() if self.mode == "graph" else None


# -- caches ---------------------------------------------------------------------------------

class LRUCache:
    """A bounded, thread-safe least-recently-used map with hit/miss counts."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"size": len(self), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


def _pixel_keys(pixels: torch.Tensor) -> list[tuple]:
    """Content keys of (B, 3, 224, 224) CLIP inputs: one device→host copy for the batch,
    5–10× fewer bytes to hash than the 512² images they come from."""
    data = pixels.detach().contiguous().cpu()
    return [(str(data.dtype), hashlib.blake2b(row.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest())
            for row in data]


# -- CPU memory ------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_cpu_memory() -> bool:
    """Keep freed CPU memory in the process heap for reuse, as PyTorch's caching allocator does
    on a GPU. Process-wide and lasting; glibc (Linux) only: elsewhere it does nothing and
    returns False.

    glibc hands out every block over 32 MiB (a 512² activation: 64 channels × 4 bytes is 64
    MiB) as fresh pages from mmap and unmaps it on free, so the kernel zero-fills it again on
    the next call: a third of a 512² CPU run's time was system time. With the thresholds
    raised, freed blocks stay in the heap; one arena for all threads lets the submit() worker
    reuse them too (threads' own arenas are too small for such blocks). 512² guided
    stylization on 2 cores, fp32, batch 1: 1.18 → 0.90 s called directly, 1.36 → 0.91 s
    through submit().
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all([mallopt(_M_MMAP_THRESHOLD, 1 << 30), mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1),
                mallopt(_M_ARENA_MAX, 1)])


# -- micro-batching -------------------------------------------------------------------------

@dataclass
class _Request:
    face: torch.Tensor
    style: object
    noise: str
    future: Future


# -- the engine -----------------------------------------------------------------------------

class Engine:
    """Fast stylization with a prepared Stylizer (see the module docstring).

    Args:
        stylizer: the model; the engine keeps its own prepared copy.
        clip: a CLIPEncoder on the same device, for text and reference-image styles.
        precision: "fp16", "bf16" or "fp32"; default fp16 on CUDA, fp32 on CPU (where
            fp16 is not offered).
        device: default CUDA when available, else CPU.
        cuda_graphs: capture and replay CUDA graphs per bucket (CUDA only).
        buckets: batch sizes runs are padded to; "auto" is (1, 2, 4, 8, 16, 32) where
            static shapes pay (CUDA graphs, compile) and no padding otherwise; None: no padding.
        style_cache_size: entries of each of the text and reference-image w+ caches.
        impl: op backend ("auto", "ref", "cuda", "triton").
        fused_modconv: run the modulated convolutions as the modulated_conv2d op (per-sample
            weights, backend ``impl``) instead of the default unfused form, conv(x·s, W)
            through cuDNN with one weight for the whole batch (see README "Performance").
        channels_last: keep weights and activations in NHWC. Default: on the CPU, where oneDNN's
            convolutions took 1.65 s instead of 2.2 s for a 512² stylization (2 cores, fp32);
            off on CUDA until measured there (bench config mmfs-fast-channels-last).
        cudnn_benchmark: let cuDNN time its algorithms for each new shape (once, while warming
            up: the engine's shapes are static) instead of choosing them by heuristics; set only
            around the engine's own runs.
        compile: run through ``torch.compile(mode="max-autotune")`` instead of hand-captured graphs.
        max_batch, max_wait_ms: micro-batching of ``submit()``: a batch runs when it has
            max_batch requests or max_wait_ms after its first request arrived.
        graph_memory_limit: bytes of reserved CUDA memory above which no new graph is
            captured (those batch sizes then run eagerly).
        retain_cpu_memory: on the CPU, call :func:`retain_freed_cpu_memory` (freed memory
            stays in the process for reuse: 1.3× faster at 512²).
    """

    def __init__(self, stylizer: Stylizer, clip=None, precision: str | None = None, device=None,
                 cuda_graphs: bool = True, buckets: Sequence[int] | str | None = "auto",
                 style_cache_size: int = 256, impl: str = "auto", fused_modconv: bool = False,
                 channels_last: bool | None = None, cudnn_benchmark: bool = True, compile: bool = False,
                 max_batch: int | None = None, max_wait_ms: float = 2.0, graph_memory_limit: int | None = None,
                 retain_cpu_memory: bool = True):
        if not isinstance(stylizer, Stylizer):
            raise TypeError(f"stylizer must be a mmfs_fast Stylizer, got {type(stylizer).__name__}")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = self.device.type == "cuda"
        precision = precision or ("fp16" if on_cuda else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and not on_cuda:
            raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
        if clip is not None and torch.device(clip.device).type != self.device.type:
            raise ValueError(f"the CLIP encoder is on {clip.device} but the engine runs on {self.device}")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        if retain_cpu_memory and not on_cuda:
            retain_freed_cpu_memory()
        self.config = stylizer.config
        self.clip = clip
        if channels_last is None:
            channels_last = not on_cuda
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = prepare_stylizer(stylizer, self.dtype, impl, fused_modconv, conv_adds_bias=not on_cuda).to(
            self.device, memory_format=self.memory_format)
        self.cudnn_benchmark = cudnn_benchmark

        mode = "compile" if compile else "graph" if cuda_graphs and on_cuda else "eager"
        if buckets == "auto":
            buckets = DEFAULT_BUCKETS if mode != "eager" else None
        if buckets is not None:
            buckets = tuple(sorted(set(buckets)))
            if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
                raise ValueError(f"buckets must be positive ints, got {buckets}")
        self._executor = _Executor(self.device, buckets, mode, graph_memory_limit)
        wrap = (lambda f: torch.compile(f, mode="max-autotune", dynamic=False)) if compile else (lambda f: f)
        self._encode_fn = wrap(self.model.encoder)
        self._decode_fn = wrap(self._decode_graph)
        self._stylize_fn = wrap(self._stylize_graph)
        self._image_style_fn = wrap(self._image_style_graph)
        self._text_style_fn = wrap(self._text_style_graph)

        self.text_cache = LRUCache(style_cache_size)
        self.image_cache = LRUCache(style_cache_size)

        self.max_batch = max_batch or (buckets[-1] if buckets else DEFAULT_BUCKETS[-1])
        if self.max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {self.max_batch} and {max_wait_ms}")
        self.max_wait_ms = max_wait_ms
        self._queue: list[_Request] = []
        self._batch_sizes: Counter = Counter()  # micro-batches run, by size
        self._queue_cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def buckets(self) -> tuple[int, ...] | None:
        return self._executor.buckets

    # -- the captured functions (tensors in, tensor out; no host syncs) --------------------
    def _decode_graph(self, feat: torch.Tensor, w_plus: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        m = self.model
        blocks = [(getattr(m, f"decoder{i}a"), getattr(m, f"decoder{i}b"), getattr(m, f"to_rgb{i}"))
                  for i in range(1, N_UPSAMPLINGS + 1)]
        noises = list(noises) or [None] * (1 + 2 * N_UPSAMPLINGS)
        return synthesize(m.decoder0, m.to_rgb0, blocks, feat, w_plus, noises).clamp(-1, 1)

    def _stylize_graph(self, faces: torch.Tensor, w_plus: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        return self._decode_graph(self.model.encoder(faces), w_plus, *noises)

    def _image_style_graph(self, pixels: torch.Tensor) -> torch.Tensor:
        # clip_mapper L2-normalises the embedding itself
        return self.model.clip_mapper(self.clip.model.encode_image(pixels).float())

    def _text_style_graph(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.clip_mapper(self.clip.model.encode_text(tokens).float())

    def _run(self, name: str, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        with self._executor.lock, _cudnn_benchmark(self.cudnn_benchmark):
            return self._executor.run(name, fn, *inputs)

    # -- input checks ----------------------------------------------------------------------
    def _faces(self, faces: torch.Tensor) -> torch.Tensor:
        size = self.config.size
        _check_tensor("faces", faces, (None, 3, size, size))
        return faces.to(self.device, self.dtype, memory_format=self.memory_format)

    def _w_plus(self, w_plus: torch.Tensor, batch: int) -> torch.Tensor:
        _check_tensor("w_plus", w_plus, (batch, N_LATENT, self.config.style_dim))
        return w_plus.to(self.device, torch.float32)

    def _noises(self, noise: NoiseSpec, batch: int) -> list[torch.Tensor]:
        """The noise inputs of a run: none for "zero", else one (B, 1, r, r) map per conv."""
        noises = make_noises(noise, batch, self.model.noise_resolutions, self.device, self.dtype)
        return [] if noises[0] is None else [n.expand(batch, -1, -1, -1) for n in noises]

    # -- public API ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, faces: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) faces in [-1, 1] → encoder features (B, 8·ngf, S/16, S/16) in the engine dtype."""
        return self._run("encode", self._encode_fn, self._faces(faces))

    @torch.inference_mode()
    def decode(self, feats: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """Encoder features + (B, 10, D) w+ → float32 images in [-1, 1]."""
        r = self.model.feature_size
        _check_tensor("feats", feats, (None, self.model.decoder0.conv.weight.shape[1], r, r))
        feats = feats.to(self.device, self.dtype, memory_format=self.memory_format)
        w_plus = self._w_plus(w_plus, feats.shape[0])
        return self._run("decode", self._decode_fn, feats, w_plus, *self._noises(noise, feats.shape[0])).float()

    @torch.inference_mode()
    def stylize(self, faces: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "zero") -> torch.Tensor:
        """(B, 3, S, S) faces in [-1, 1] in the style (B, 10, D) w+ → float32 images in [-1, 1].

        noise: "zero" (no noise), "random" (fresh N(0, 1) maps from torch's RNG) or
        explicit maps, one (B or 1, 1, r, r) tensor per conv layer (Stylizer.noise_resolutions).
        """
        faces = self._faces(faces)
        w_plus = self._w_plus(w_plus, faces.shape[0])
        return self._run("stylize", self._stylize_fn, faces, w_plus, *self._noises(noise, faces.shape[0])).float()

    @torch.inference_mode()
    def style_from_seed(self, seeds: int | Sequence[int]) -> torch.Tensor:
        """w+ (B, 10, D) of seeds: z from :func:`~mmfs_fast.models.stylizer.z_from_seeds`, mapped
        and repeated over the 10 slots."""
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if not seeds:
            raise ValueError("style_from_seed needs at least one seed")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63:
                raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
        return self.style_from_z(z_from_seeds(seeds, self.config.style_dim))

    @torch.inference_mode()
    def style_from_z(self, z: torch.Tensor) -> torch.Tensor:
        """w+ (B, 10, D) of (B, D) latents z: mapped in fp32 and repeated over the 10 slots."""
        _check_tensor("z", z, (None, self.config.style_dim))
        return self.model.mapping_z(z.to(self.device, torch.float32))[:, None].repeat(1, N_LATENT, 1)

    @torch.inference_mode()
    def style_from_clip(self, feats: torch.Tensor) -> torch.Tensor:
        """w+ (B, 10, D) of (B, D) CLIP embeddings (e.g. of reference images preprocessed on
        the host) through the fp32 clip_mapper."""
        self._check_clip_mapper()
        _check_tensor("clip_feats", feats, (None, self.config.style_dim))
        return self.model.clip_mapper(feats.to(self.device, torch.float32))

    @torch.inference_mode()
    def style_from_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """w+ (B, 10, D) of text prompts through CLIP and the clip_mapper (LRU-cached per prompt)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text prompts must be non-empty strings, got {t!r}")
        if not texts:
            raise ValueError("style_from_text needs at least one prompt")
        self._check_clip()
        return self._cached_styles(self.text_cache, texts, texts, lambda todo: self._run(
            "text_style", self._text_style_fn, self.clip.tokenizer(todo).to(self.device)))

    @torch.inference_mode()
    def style_from_image(self, images: torch.Tensor) -> torch.Tensor:
        """w+ (B, 10, D) of (B, 3, H, W) reference images in [-1, 1] through CLIP and the
        clip_mapper (LRU-cached per image content)."""
        _check_tensor("images", images, (None, 3, None, None))
        self._check_clip()
        # one batched resize on the device; the w+ depends on nothing but these CLIP pixels
        pixels = self.clip.preprocess(images.to(self.device))
        if self.image_cache.capacity == 0:
            return self._run("image_style", self._image_style_fn, pixels)
        return self._cached_styles(self.image_cache, _pixel_keys(pixels), list(pixels), lambda todo: self._run(
            "image_style", self._image_style_fn, torch.stack(todo)))

    def _check_clip(self) -> None:
        if self.clip is None:
            raise RuntimeError("text and reference-image styles need a CLIP encoder: "
                               "Engine(stylizer, clip=CLIPEncoder(...))")
        self._check_clip_mapper()

    def _check_clip_mapper(self) -> None:
        if self.model.clip_mapper is None:
            raise RuntimeError("this Stylizer has no clip_mapper (phase 1/2 checkpoint): text and reference "
                               "styles need a phase 3/4 checkpoint")

    @staticmethod
    def _cached_styles(cache: LRUCache, keys: list, items: list, compute: Callable) -> torch.Tensor:
        """w+ of each item: cached ones looked up, the others computed in one batch and cached."""
        found = {key: w for key in dict.fromkeys(keys) if (w := cache.get(key)) is not None}
        todo = {key: item for key, item in zip(keys, items) if key not in found}
        if todo:
            for key, w in zip(todo, compute(list(todo.values()))):
                found[key] = w
                cache.put(key, w)
        return torch.stack([found[key] for key in keys])

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
    def submit(self, face: torch.Tensor, style, noise: str = "zero") -> Future:
        """Queue one (3, S, S) face for stylization; returns a Future of the (3, S, S) image.

        style: a seed (int), a text prompt (str), a reference image ((3, H, W) tensor in
        [-1, 1]) or a w+ ((10, D) tensor). Requests arriving within ``max_wait_ms`` run
        as one batch; a bad request fails only its own Future.
        """
        future: Future = Future()
        with self._queue_cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(_Request(face, style, noise, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="mmfs-engine", daemon=True)
                self._worker.start()
            self._queue_cond.notify()
        return future

    def queue_stats(self) -> dict:
        """Requests waiting for a micro-batch, and how many micro-batches of each size ran."""
        with self._queue_cond:
            return {"queued": len(self._queue), "batch_sizes": dict(self._batch_sizes)}

    def close(self) -> None:
        """Finish every submitted request, then stop the batching thread."""
        with self._queue_cond:
            self._closed = True
            self._queue_cond.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closed:
                    self._queue_cond.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while len(self._queue) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._queue_cond.wait(left)
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._batch_sizes[len(batch)] += 1
            self._process([r for r in batch if r.future.set_running_or_notify_cancel()])

    def _process(self, requests: list[_Request]) -> None:
        """Run one batch of requests; each error goes to its own request's Future."""
        pending = []
        for request in requests:
            try:
                _check_tensor("face", request.face, (3, self.config.size, self.config.size))
                if request.noise not in NOISE_MODES:
                    raise ValueError(f"noise must be one of {NOISE_MODES}, got {request.noise!r}")
                pending.append((request, _style_kind(request.style)))
            except Exception as e:
                request.future.set_exception(e)
        resolvers = {"seed": self.style_from_seed, "text": self.style_from_text,
                     "image": lambda images: self.style_from_image(torch.stack(images)),
                     "w+": lambda ws: self._w_plus(torch.stack(ws), len(ws))}
        styled = []
        for kind, resolve in resolvers.items():
            group = [request for request, k in pending if k == kind]
            for request, w_plus in zip(group, _batched(resolve, [r.style for r in group])):
                if isinstance(w_plus, Exception):
                    request.future.set_exception(w_plus)
                else:
                    styled.append((request, w_plus))
        for noise in NOISE_MODES:
            group = [(r, w) for r, w in styled if r.noise == noise]
            results = _batched(lambda items: self.stylize(torch.stack([r.face for r, _ in items]),
                                                          torch.stack([w for _, w in items]), noise), group)
            for (request, _), image in zip(group, results):
                if isinstance(image, Exception):
                    request.future.set_exception(image)
                else:
                    request.future.set_result(image)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _style_kind(style) -> str:
    if isinstance(style, int) and not isinstance(style, bool):
        return "seed"
    if isinstance(style, str):
        return "text"
    if isinstance(style, torch.Tensor) and style.ndim in (2, 3):
        return "w+" if style.ndim == 2 else "image"
    shape = f" of shape {tuple(style.shape)}" if isinstance(style, torch.Tensor) else ""
    raise TypeError(f"style must be a seed (int), a text prompt (str), a reference image (3, H, W) tensor or a "
                    f"w+ (10, D) tensor; got {type(style).__name__}{shape}")


def _batched(fn: Callable, items: list) -> list:
    """fn(items), one result per item, computed as one batch; if the batch fails, item by
    item, so that an error (as the item's result) stays with the item that caused it."""
    if not items:
        return []
    try:
        return list(fn(items))
    except Exception:
        results = []
        for item in items:
            try:
                results.append(fn([item])[0])
            except Exception as e:
                results.append(e)
        return results


def _check_tensor(name: str, t, shape: tuple) -> None:
    """A finite floating tensor of ``shape`` (None matches any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
