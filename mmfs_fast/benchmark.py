"""End-to-end latency and throughput: the workloads that bench/ measures with
pytest-benchmark and that ``mmfs-fast bench`` reports on the user's machine.

The four inference workloads of the paper's timing table (SPEC §7):
image → w+ (CLIP image encoding + CLIP mapper), text → w+ (tokenise, CLIP text
encoding + mapper), random sampling (face + z → stylized face) and guided
stylization (face + a cached w+ → stylized face).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import mmfs_fast
from mmfs_fast import ops
from mmfs_fast.models import N_LATENT, Stylizer, StylizerConfig
from mmfs_fast.precision import PRECISIONS as DTYPES  # the one precision table (bench/ reads mb.DTYPES)

SCENARIOS = ("image_to_wplus", "text_to_wplus", "random_sampling", "guided_stylization")
PROMPTS = ("a pop art portrait", "an oil painting", "a pencil sketch", "a 3d cartoon character")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Model sizes and batch sizes of a benchmark run."""
    name: str
    stylizer: StylizerConfig
    batches: tuple[int, ...]
    small_encoders: bool = False  # small CLIP and DINO of the same interfaces instead of ViT-B/32, ViT-B/8


# The real thing: 512² Stylizer and CLIP ViT-B/32, as the targets are stated.
FULL = Profile("gpu-512", StylizerConfig(), batches=(1, 8, 32))
# For machines without a GPU: same code paths at a size a 2-core CPU runs in seconds.
# style_dim stays 512 because the CLIP mapper consumes CLIP's 512-d embeddings.
REDUCED = Profile("cpu-reduced-64", StylizerConfig(size=64, ngf=8, style_dim=512), batches=(1, 2), small_encoders=True)


def default_profile(device: torch.device) -> Profile:
    return FULL if device.type == "cuda" else REDUCED


# -- measuring ----------------------------------------------------------------------
def synced_timer() -> float:
    """time.perf_counter after waiting for queued GPU work, so a timed span covers the kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> float | None:
    """Restart peak tracking; returns the MiB allocated now (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2 ** 20


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _git_commit() -> str | None:
    """HEAD of the checkout being measured (with -dirty when it has local changes)."""
    for where in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(mmfs_fast.__file__)))):
        try:
            run = functools.partial(subprocess.run, cwd=where, capture_output=True, text=True, timeout=10, check=True)
            commit = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
            dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        return commit + ("-dirty" if dirty else "")
    return None


@functools.cache
def environment() -> dict:
    """What a result depends on: device, library versions, op backends, commit."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                           f"{os.cpu_count()} cores)",
        "device_type": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "mmfs_fast": mmfs_fast.__version__,
        "backends": ops.backends(),
        "git_commit": _git_commit(),
    }


# -- the workloads ------------------------------------------------------------------
def _identity(fn):
    return fn


class Workloads:
    """The four scenarios as no-argument calls on fixed random inputs; subclasses say how
    each one runs."""

    config: StylizerConfig
    device: torch.device
    dtype: torch.dtype  # of the input faces

    def workload(self, scenario: str, batch: int, seed: int = 0) -> Callable[[], torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape):
            return torch.randn(shape, generator=gen).to(device=self.device, dtype=self.dtype)

        size, dim = self.config.size, self.config.style_dim
        faces = rand(batch, 3, size, size).clamp(-1, 1)
        if scenario == "image_to_wplus":
            return lambda: self.image_to_wplus(faces)
        if scenario == "text_to_wplus":
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            return lambda: self.text_to_wplus(prompts)
        if scenario == "random_sampling":
            z = rand(batch, dim)
            return lambda: self.random_sampling(faces, z, seed)
        if scenario == "guided_stylization":
            w_plus = rand(batch, N_LATENT, dim)
            return lambda: self.guided_stylization(faces, w_plus)
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")


class ModelPipeline(Workloads):
    """The plain Stylizer + CLIP encoder, eagerly or through torch.compile: the baseline
    that stands for the official code."""

    def __init__(self, stylizer: Stylizer, clip, compile: bool = False):
        weight = stylizer.decoder0.conv.weight
        self.config, self.device, self.dtype = stylizer.config, weight.device, weight.dtype
        self.stylizer, self.clip = stylizer, clip
        wrap = torch.compile if compile else _identity
        self._image_to_wplus = wrap(self._embed_image)
        self._tokens_to_wplus = wrap(self._embed_tokens)
        self._stylize = wrap(stylizer)

    def _embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.stylizer.map_clip(self.clip.encode_image(images).to(self.dtype))

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # CLIPEncoder.encode_text minus tokenising, which stays outside the compiled region
        feats = F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1)
        return self.stylizer.map_clip(feats.to(self.dtype))

    @torch.no_grad()
    def image_to_wplus(self, images):
        return self._image_to_wplus(images)

    @torch.no_grad()
    def text_to_wplus(self, prompts):
        return self._tokens_to_wplus(self.clip.tokenizer(prompts).to(self.device))

    @torch.no_grad()
    def random_sampling(self, faces, z, seed):
        return self._stylize(faces, z=z)  # official behaviour: fresh random noise maps

    @torch.no_grad()
    def guided_stylization(self, faces, w_plus):
        return self._stylize(faces, w_plus=w_plus)


class EnginePipeline(Workloads):
    """mmfs_fast.Engine. Its style caches are off, so repeated calls measure the work
    rather than a cache hit; random sampling draws z from seeds, as the engine does."""

    def __init__(self, engine):
        self.engine, self.config, self.device = engine, engine.config, engine.device
        self.dtype = torch.float32

    def image_to_wplus(self, images):
        return self.engine.style_from_image(images)

    def text_to_wplus(self, prompts):
        return self.engine.style_from_text(prompts)

    def random_sampling(self, faces, z, seed):
        # mapping network and render in one graph (Engine.stylize_seed)
        return self.engine.stylize_seed(faces, list(range(seed, seed + len(faces))))

    def guided_stylization(self, faces, w_plus):
        return self.engine.stylize(faces, w_plus)


def fastest_pipeline(stylizer: Stylizer, clip, precision: str, impl: str = "auto", **engine_options) -> EnginePipeline:
    """The fastest mmfs_fast configuration: the Engine with CUDA graphs (where there is CUDA);
    engine_options (channels_last, compile, cudnn_benchmark) select the variants bench/ compares."""
    from mmfs_fast.engine import Engine

    return EnginePipeline(Engine(stylizer, clip, precision=precision, device=clip.device, cuda_graphs=True,
                                 style_cache_size=0, impl=impl, **engine_options))


def build_models(profile: Profile, device, dtype: torch.dtype = torch.float32, impl: str = "auto",
                 ckpt: str | None = None, clip_weights: str | None = None, clip_dtype: torch.dtype | None = None,
                 allow_cast: bool = False, trust_torchscript: bool = False):
    """(Stylizer in ``dtype``, CLIPEncoder in ``clip_dtype`` or ``dtype``) on ``device``: from
    the given files, random-initialised otherwise."""
    clip_dtype = clip_dtype or dtype
    from mmfs_fast.encoders import CLIPEncoder

    if ckpt is not None:
        stylizer = Stylizer.from_checkpoint(ckpt, device=device, dtype=dtype, impl=impl, allow_cast=allow_cast)
    else:
        torch.manual_seed(0)
        stylizer = Stylizer(profile.stylizer, impl=impl).to(device=device, dtype=dtype).eval()
    stylizer.requires_grad_(False)
    clip = CLIPEncoder(clip_weights, random_init=clip_weights is None, device=device, dtype=clip_dtype,
                       trust_torchscript=trust_torchscript)
    if profile.small_encoders and clip_weights is None:
        clip.model = _tiny_clip().to(device=device, dtype=clip_dtype).eval().requires_grad_(False)
    return stylizer, clip


def build_dino(profile: Profile, device, dtype: torch.dtype = torch.float32):
    """A random-initialised DINOEncoder (fine-tuning's structure loss); a 1-layer one in the
    reduced profile."""
    from mmfs_fast.encoders import DINOEncoder

    dino = DINOEncoder(random_init=True, device=device, dtype=dtype)
    if profile.small_encoders:
        import timm

        tiny = timm.models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=32, embed_dim=64, depth=1, num_heads=2, dynamic_img_size=True)
        dino.model = tiny.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return dino


def _tiny_clip():
    """A CLIP with ViT-B/32's inputs and 512-d outputs but narrow towers (4 vision layers: the
    encoder reads block 3's tokens)."""
    import open_clip

    return open_clip.CLIP(embed_dim=512, quick_gelu=True,
                          vision_cfg=dict(layers=4, width=64, head_width=32, patch_size=32, image_size=224),
                          text_cfg=dict(layers=1, width=64, heads=2, context_length=77, vocab_size=49408))


# -- mmfs-fast bench ----------------------------------------------------------------
def time_workload(fn: Callable[[], torch.Tensor], rounds: int, warmup: int, tick: Callable[[], None]) -> list[float]:
    """Seconds per call of ``fn`` over ``rounds`` timed calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + rounds):
        start = synced_timer()
        fn()
        if i >= warmup:
            times.append(synced_timer() - start)
        tick()
    return times


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes, got {text!r}")
    return batches


def add_cli_parser(subparsers) -> None:
    from mmfs_fast.commands.common import add_trust_options

    p = subparsers.add_parser(
        "bench", help="quick end-to-end latency/throughput report on this machine",
        description="Times image→w+, text→w+, random sampling and guided stylization at 512² "
                    "(a reduced 64² model on the CPU unless --full) and prints a table. "
                    "The detailed benchmark suite is `pytest bench/` in the source tree.")
    p.add_argument("--ckpt", help="MMFS checkpoint (default: a random-initialised model; timings are the same)")
    p.add_argument("--clip-weights", help="CLIP ViT-B/32 weights (default: random-initialised)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--precision", choices=sorted(DTYPES), help="default: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--impl", default="auto", choices=["auto", "ref", "cuda", "triton"], help="op backend")
    p.add_argument("--batch-sizes", type=_parse_batches, help="e.g. 1,8,32 (default: 1,8,32 on a GPU, 1,2 on the CPU)")
    p.add_argument("--rounds", type=int, help="timed calls per case (default: 20 on a GPU, 3 on the CPU)")
    p.add_argument("--full", action="store_true", help="full 512² model on the CPU too (slow)")
    add_trust_options(p)
    p.set_defaults(func=run_cli)


def _usage_error(message: str) -> int:
    print(f"mmfs-fast bench: error: {message}", file=sys.stderr)
    return 2


def run_cli(args) -> int:
    from tqdm import tqdm

    from mmfs_fast.encoders import EncoderWeightsError
    from mmfs_fast.models import CheckpointError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error(f"--device {args.device}, but CUDA is not available here")
    gpu = device.type == "cuda"
    precision = args.precision or ("fp16" if gpu else "fp32")
    if precision == "fp16" and not gpu:
        return _usage_error("fp16 needs a CUDA device; use --precision bf16 or fp32 on the CPU")
    rounds = args.rounds or (20 if gpu else 3)
    if rounds < 1:
        return _usage_error("--rounds must be >= 1")
    profile = FULL if gpu or args.full or args.ckpt else REDUCED
    batches = args.batch_sizes or profile.batches
    warmup = 3 if gpu else 1
    if args.ckpt is None or args.clip_weights is None:
        print("mmfs-fast bench: NOTICE: random-initialised weights where none were given "
              "(outputs are meaningless, timings are representative)", file=sys.stderr)
    try:
        # the engine casts its own copy of the fp32 Stylizer; CLIP runs in the dtype it is given
        stylizer, clip = build_models(profile, device, torch.float32, args.impl, args.ckpt, args.clip_weights,
                                      clip_dtype=DTYPES[precision], allow_cast=args.allow_cast,
                                      trust_torchscript=args.trust_torchscript)
        pipeline = fastest_pipeline(stylizer, clip, precision, args.impl)
    except (CheckpointError, EncoderWeightsError) as e:
        return _usage_error(e.cli_message())
    except (ValueError, RuntimeError) as e:
        return _usage_error(str(e))
    env = environment()
    print(f"# mmfs-fast bench: {env['device']}, {profile.name}, Engine {precision} "
          f"({pipeline.engine.memory_stats()['mode']}), impl={args.impl}, torch {env['torch']}, "
          f"backends {env['backends']}")
    results = []
    with tqdm(total=len(SCENARIOS) * len(batches) * (warmup + rounds), desc="bench", file=sys.stderr) as bar:
        for scenario in SCENARIOS:
            for batch in batches:
                bar.set_postfix_str(f"{scenario} b{batch}")
                reset_peak_memory(device)
                times = time_workload(pipeline.workload(scenario, batch), rounds, warmup, bar.update)
                results.append((scenario, batch, statistics.median(times), peak_memory_mib(device)))
    print("| workload | batch | median ms | img/s | peak MiB |\n|---|---:|---:|---:|---:|")
    for scenario, batch, seconds, mem in results:
        print(f"| {scenario} | {batch} | {seconds * 1e3:.2f} | {batch / seconds:.1f} | "
              f"{'-' if mem is None else f'{mem:.0f}'} |")
    return 0
