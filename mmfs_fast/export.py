"""Export for use outside Python: ONNX files (onnxruntime, TensorRT) and AOTInductor packages
(``.pt2``: C++ through ``torch::inductor::AOTIModelPackageLoader``, Python through
``torch._inductor.aoti_load_package``).

Graphs, batch first (``batch`` is a fixed size, or a dynamic axis with ``dynamic_batch``):

- ``stylize``: faces (B, 3, S, S) in [-1, 1], w_plus (B, 10, D)[, noise0 … noise8 (B, 1, r, r)]
  → images (B, 3, S, S) in [-1, 1];
- ``style-image``: pixels (B, 3, 224, 224), already CLIP-normalised → w_plus (B, 10, D);
- ``style-text``: tokens (B, 77) int64 CLIP token ids, tokenized by the caller → w_plus;
- ``random-style``: z (B, D) ~ N(0, I) → w_plus (the mapping network, repeated over the slots).

Floating inputs and outputs are float32 whatever the compute dtype. Every graph is the
Engine's prepared model (:func:`~mmfs_fast.engine.prepare_stylizer`) on the ``ref`` ops with
the unfused modulated convolution, conv(x·s, W) · demod: standard convolutions only, so the
files hold nothing a stock runtime lacks (no custom domain, no mmfs_fast op). A float16
export keeps the style affines and the demodulation coefficients in float32, as the Engine
does, and leaves the style graphs in float32.

Each file carries its metadata (:func:`read_metadata`): the graph, model config, inputs and
outputs with shapes and value ranges, compute dtype, mmfs_fast and torch versions, and the
SHA-256 of the source checkpoint. Files are written atomically: nothing, or the whole file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mmfs_fast.encoders.clip import INPUT_SIZE as CLIP_INPUT_SIZE
from mmfs_fast.encoders.clip import MEAN as CLIP_MEAN
from mmfs_fast.encoders.clip import STD as CLIP_STD
from mmfs_fast.atomic import write_bytes
from mmfs_fast.errors import MMFSError
from mmfs_fast.models.inference import prepare_stylizer
from mmfs_fast.models.stylizer import N_LATENT, Stylizer
from mmfs_fast.precision import PRECISIONS, precision_name

GRAPHS = ("stylize", "style-image", "style-text", "random-style")
CLIP_GRAPHS = ("style-image", "style-text")
FORMATS = {"onnx": ".onnx", "aoti": ".pt2"}
DTYPES = ("float32", "float16")  # of the stylize graph; bfloat16 convolutions are rare in ONNX runtimes
ONNX_OPSET = 18
METADATA_KEY = "mmfs_fast"  # ONNX metadata_props / AOTInductor package metadata: a JSON object
# the extremes of (x - mean) / std over the channels for x in [0, 1]
CLIP_PIXEL_RANGE = (round(min(-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)), 4),
                    round(max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)), 4))
TOKENIZER_NOTE = ("CLIP BPE ids as open_clip.get_tokenizer('ViT-B-32-quickgelu') (or OpenAI's clip.tokenize) "
                  "returns them: 49406 (start), the prompt, 49407 (end), zeros up to 77; the embedding is read at "
                  "the end token, the largest id")


class ExportError(MMFSError, ValueError):
    """Options that cannot be exported, or an output that cannot be written."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, and "batch" for the batch axis
    dtype: str = "float32"
    range: tuple | None = None
    about: str = ""

    def example(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        shape = [batch if d == "batch" else d for d in self.shape]
        if self.dtype == "int64":
            return torch.randint(0, int(self.range[1]) + 1, shape, generator=generator)
        return torch.randn(shape, generator=generator)


# -- the graphs -------------------------------------------------------------------------------

class StylizeGraph(nn.Module):
    """faces, w+[, noise maps] → images: the Engine's stylization of its prepared model."""

    def __init__(self, model: Stylizer, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, faces: torch.Tensor, w_plus: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        feats = self.model.encoder(faces.to(self.dtype))
        noises = [n.to(self.dtype) for n in noises] or None
        return self.model.synthesize(feats, w_plus, noises).clamp(-1, 1)


class StyleFromImageGraph(nn.Module):
    """CLIP-normalised pixels → w+ (the Engine's reference-image style). The text tower, unused,
    stays out of the exported file (both exporters drop unused weights)."""

    def __init__(self, clip_model: nn.Module, clip_mapper: nn.Module):
        super().__init__()
        self.clip_model, self.clip_mapper = clip_model, clip_mapper

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(next(self.clip_model.visual.parameters()).dtype)
        return self.clip_mapper(self.clip_model.encode_image(pixels).float())  # clip_mapper L2-normalises


class StyleFromTextGraph(nn.Module):
    """CLIP token ids → w+ (the Engine's text style), without the image tower."""

    def __init__(self, clip_model: nn.Module, clip_mapper: nn.Module):
        super().__init__()
        self.clip_model, self.clip_mapper = clip_model, clip_mapper

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip_mapper(self.clip_model.encode_text(tokens).float())


class RandomStyleGraph(nn.Module):
    """z → w+ (the Engine's seed style, without the seeding)."""

    def __init__(self, mapping: nn.Module):
        super().__init__()
        self.mapping = mapping

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mapping(z.float())[:, None].repeat(1, N_LATENT, 1)


def build_graph(name: str, model: Stylizer, dtype: torch.dtype, clip=None, noise_inputs: bool = False
                ) -> tuple[nn.Module, list[TensorSpec], list[TensorSpec]]:
    """(module, inputs, outputs) of graph ``name`` on the prepared ``model``."""
    size, dim = model.config.size, model.config.style_dim
    w_plus = TensorSpec("w_plus", ("batch", N_LATENT, dim), about="style w+, batch first")
    if name == "stylize":
        inputs = [TensorSpec("faces", ("batch", 3, size, size), range=(-1.0, 1.0),
                             about="aligned RGB faces, x / 127.5 - 1"), w_plus]
        if noise_inputs:
            inputs += [TensorSpec(f"noise{i}", ("batch", 1, r, r), about=f"N(0, 1) noise of conv {i}")
                       for i, r in enumerate(model.noise_resolutions)]
        images = TensorSpec("images", ("batch", 3, size, size), range=(-1.0, 1.0),
                            about="RGB; to 8 bits: clamp(x * 0.5 + 0.5, 0, 1) * 255")
        return StylizeGraph(model, dtype), inputs, [images]
    if name == "random-style":
        return RandomStyleGraph(model.mapping_z), [TensorSpec("z", ("batch", dim), about="z ~ N(0, I)")], [w_plus]
    if name == "style-image":
        pixels = TensorSpec("pixels", ("batch", 3, CLIP_INPUT_SIZE, CLIP_INPUT_SIZE), range=CLIP_PIXEL_RANGE,
                            about=f"reference image resized to {CLIP_INPUT_SIZE}², x in [0, 1], (x - mean) / std per "
                                  f"channel, mean {CLIP_MEAN}, std {CLIP_STD}")
        return StyleFromImageGraph(clip.model, model.clip_mapper), [pixels], [w_plus]
    if name == "style-text":
        vocab = clip.model.vocab_size
        context = clip.model.context_length
        tokens = TensorSpec("tokens", ("batch", context), dtype="int64", range=(0, vocab - 1), about=TOKENIZER_NOTE)
        return StyleFromTextGraph(clip.model, model.clip_mapper), [tokens], [w_plus]
    raise ExportError(f"unknown graph {name!r}; choose from {', '.join(GRAPHS)} or 'all'")


def _dynamic_shapes(module: nn.Module, inputs: list[TensorSpec]):
    """torch.export's dynamic_shapes: the batch axis of every input, one symbol for all."""
    batch = {0: torch.export.Dim("batch", min=1)}
    if isinstance(module, StylizeGraph) and len(inputs) > 2:  # forward(faces, w_plus, *noises)
        return (batch, batch, (batch,) * (len(inputs) - 2))
    return (batch,) * len(inputs)


# -- exporters: a module and its example inputs → the file's bytes ------------------------------

def _onnx_bytes(module: nn.Module, examples: tuple, inputs: list[TensorSpec], outputs: list[TensorSpec],
                dynamic_shapes, metadata: dict) -> bytes:
    import onnx

    with warnings.catch_warnings():
        # every input's batch axis is the one symbol "batch": the exporter says it renames none of them
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(module, examples, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                    input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                                    dynamic_shapes=dynamic_shapes)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    return proto.SerializeToString()


def _aoti_bytes(module: nn.Module, examples: tuple, inputs: list[TensorSpec], outputs: list[TensorSpec],
                dynamic_shapes, metadata: dict) -> bytes:
    program = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes)
    package = io.BytesIO()
    torch._inductor.aoti_compile_and_package(
        program, package_path=package, inductor_configs={"aot_inductor.metadata": {METADATA_KEY: json.dumps(metadata)}})
    return package.getvalue()


EXPORTERS = {"onnx": _onnx_bytes, "aoti": _aoti_bytes}


def read_metadata(path) -> dict:
    """The metadata :func:`export` wrote into an ONNX file or an AOTInductor package."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):  # an AOTInductor package; an ONNX file is a protobuf message
            props = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model")
        else:
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    except Exception as e:  # onnx and the package reader raise many types for foreign files
        raise ExportError(f"{path}: not a file exported by mmfs_fast ({type(e).__name__}: {e})") from e


# -- the public API -----------------------------------------------------------------------------

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source(path) -> dict | None:
    return None if path is None else {"file": Path(path).name, "sha256": file_sha256(path)}


def resolve_graphs(what: str | Sequence[str]) -> list[str]:
    names = [what] if isinstance(what, str) else list(what)
    if "all" in names:
        return list(GRAPHS)
    unknown = [n for n in names if n not in GRAPHS]
    if unknown or not names:
        raise ExportError(f"unknown graph {', '.join(map(repr, unknown)) or '(none)'}; choose from "
                          f"{', '.join(GRAPHS)} or 'all'")
    return list(dict.fromkeys(names))


def output_paths(out, graphs: list[str], format: str) -> dict[str, Path]:
    """One graph: ``out`` is the file (or a folder to put ``<graph><suffix>`` in); several: a folder."""
    out = Path(out)
    if len(graphs) == 1 and not out.is_dir():
        return {graphs[0]: out}
    return {name: out / f"{name}{FORMATS[format]}" for name in graphs}


def check_writable(path: Path) -> None:
    """Fail before the long export, not after: a file can be created beside ``path``."""
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ExportError(f"{path}: cannot write there ({e.strerror or e})") from e


def export(stylizer: Stylizer, out, format: str = "onnx", what: str | Sequence[str] = "stylize", *, clip=None,
           dtype: str = "float32", batch_size: int = 1, dynamic_batch: bool = False, noise_inputs: bool = False,
           device="cpu", source_checkpoint=None, clip_weights=None) -> dict[str, Path]:
    """Export graphs of ``stylizer`` (see the module docstring) and return {graph: file}.

    format: "onnx" or "aoti". what: graph names, or "all". clip: a CLIPEncoder, for the
    style-image and style-text graphs. dtype: the stylize graph's compute precision
    ("float16" for GPUs; inputs and outputs stay float32). batch_size: the fixed batch, unless
    dynamic_batch. noise_inputs: the stylize graph takes one noise map per conv (else no
    noise, the Engine's default). device: where the AOTInductor package runs. source_checkpoint,
    clip_weights: the files the models came from, hashed into the metadata.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive int, got {batch_size!r}")
    if format == "onnx":
        _check_onnx_installed()
    graphs = resolve_graphs(what)
    needs_clip = [g for g in graphs if g in CLIP_GRAPHS]
    if needs_clip and stylizer.clip_mapper is None:
        source = f"{source_checkpoint}: " if source_checkpoint is not None else ""
        raise ExportError(f"{source}this checkpoint has no clip_mapper (phase 1/2): {' and '.join(needs_clip)} need "
                          f"a phase 3/4 checkpoint")
    if needs_clip and clip is None:
        raise ExportError(f"{' and '.join(needs_clip)} need a CLIP encoder: clip=CLIPEncoder('ViT-B-32.pt')")
    paths = output_paths(out, graphs, format)
    for path in paths.values():
        check_writable(path)

    device = torch.device(device)
    compute_dtype = PRECISIONS[precision_name(dtype)]
    # the stem in its separate form: its fused form pays only with the stem_conv kernel
    model = prepare_stylizer(stylizer, compute_dtype, impl="ref", stem_form="separate").to(device)
    common = {"format": format, "mmfs_fast_version": _version(), "torch": torch.__version__,
              "model_config": dataclasses.asdict(stylizer.config), "device": device.type,
              "batch": "dynamic" if dynamic_batch else batch_size,
              "source_checkpoint": _source(source_checkpoint)}
    if format == "onnx":
        common["opset"] = ONNX_OPSET
    generator = torch.Generator().manual_seed(0)
    for name, path in paths.items():
        module, inputs, outputs = build_graph(name, model, compute_dtype, clip, noise_inputs)
        module = module.eval().to(device)
        # a dynamic axis is traced at batch 2: torch.export takes a size-1 example for a constant
        examples = tuple(s.example(2 if dynamic_batch else batch_size, generator).to(device) for s in inputs)
        metadata = {"graph": name, **common,
                    "compute_dtype": dtype if name == "stylize" else "float32",
                    "inputs": [_spec_json(s, dynamic_batch, batch_size) for s in inputs],
                    "outputs": [_spec_json(s, dynamic_batch, batch_size) for s in outputs]}
        if name in CLIP_GRAPHS:
            metadata["clip_weights"] = _source(clip_weights)
        with torch.no_grad():
            data = EXPORTERS[format](module, examples, inputs, outputs,
                                     _dynamic_shapes(module, inputs) if dynamic_batch else None, metadata)
        write_bytes(path, data)
    return paths


def _check_onnx_installed() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install 'mmfs_fast[export]'")


def _spec_json(spec: TensorSpec, dynamic_batch: bool, batch_size: int) -> dict:
    shape = [d if d != "batch" or dynamic_batch else batch_size for d in spec.shape]
    return {**dataclasses.asdict(spec), "shape": shape}


def _version() -> str:
    from mmfs_fast import __version__

    return __version__


# -- command line -------------------------------------------------------------------------------

def add_cli_parser(subparsers):
    """The ``mmfs-fast export`` subcommand (hooked in by :mod:`mmfs_fast.cli`)."""
    from mmfs_fast.commands.common import add_trust_options

    p = subparsers.add_parser(
        "export", help="export graphs to ONNX or an AOTInductor package, for use outside Python",
        description="Export the stylization (faces + w+ → images) and the style graphs (reference image, CLIP "
                    "tokens or z → w+) to ONNX (onnxruntime, TensorRT) or to AOTInductor .pt2 packages (C++ "
                    "AOTIModelPackageLoader, Python aoti_load_package). Prints each file's metadata as JSON.")
    p.add_argument("--ckpt", help="MMFS checkpoint: official .pt/.pth or mmfs_fast .safetensors")
    p.add_argument("--random-init", action="store_true",
                   help="export a random-initialised model (meaningless outputs): demos and tests only")
    p.add_argument("--clip-weights", help="CLIP ViT-B/32 weights (OpenAI ViT-B-32.pt), for style-image/style-text")
    add_trust_options(p)
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True,
                   help="the file for one graph; a folder for several (<graph>.onnx / <graph>.pt2 in it)")
    p.add_argument("--what", nargs="+", default=["stylize"], choices=[*GRAPHS, "all"], metavar="GRAPH",
                   help=f"graphs to export: {', '.join(GRAPHS)} or all (default stylize)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute precision of the stylize graph (float16 for GPUs; I/O stays float32)")
    p.add_argument("--size", type=int, help="model size of --random-init (default 512); with --ckpt, a check")
    p.add_argument("--batch-size", type=int, default=1, help="the fixed batch size (default 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis instead of a fixed one")
    p.add_argument("--noise-inputs", action="store_true",
                   help="the stylize graph takes one N(0, 1) noise map per conv (default: no noise)")
    p.add_argument("--device", default="cpu", help="device the AOTInductor package runs on (cpu, cuda)")
    p.set_defaults(func=main)
    return p


def _load_stylizer(args) -> Stylizer:
    from mmfs_fast.commands.common import RANDOM_INIT_BANNER, UsageError, as_usage_error, err
    from mmfs_fast.loading import load_stylizer
    from mmfs_fast.models import CheckpointError, StylizerConfig

    if args.ckpt is None and not args.random_init:
        raise UsageError("no weights: pass --ckpt <MMFS checkpoint>, or --random-init to export a random model")
    if args.ckpt is not None and args.random_init:
        raise UsageError("give either --ckpt or --random-init, not both")
    if args.random_init:
        err(RANDOM_INIT_BANNER)
        warnings.filterwarnings("ignore", message="mmfs_fast: RANDOM-INITIALISED")  # the banner said it
    try:
        config = StylizerConfig(size=args.size or 512) if args.random_init else None
        stylizer = load_stylizer(args.ckpt, device="cpu", random_init=args.random_init, config=config,
                                 allow_cast=args.allow_cast).eval()
    except (CheckpointError, ValueError, TypeError) as e:
        raise as_usage_error(e) from e
    if args.size is not None and args.size != stylizer.config.size:
        raise UsageError(f"{args.ckpt}: the checkpoint is a {stylizer.config.size}² model, not --size {args.size}")
    return stylizer


def main(args) -> int:
    """Run ``mmfs-fast export``; bad options or inputs raise the CLI's UsageError (exit 2)."""
    from mmfs_fast.commands.common import EXIT_OK, UsageError, as_usage_error, err
    from mmfs_fast.encoders import CLIPEncoder, EncoderWeightsError

    graphs = resolve_graphs(args.what)
    stylizer = _load_stylizer(args)
    clip = None
    if any(g in CLIP_GRAPHS for g in graphs) and stylizer.clip_mapper is not None:
        if args.clip_weights is None and not args.random_init:
            raise UsageError("style-image and style-text need CLIP: pass --clip-weights ViT-B-32.pt")
        try:
            clip = CLIPEncoder(args.clip_weights, random_init=args.clip_weights is None,
                               trust_torchscript=args.trust_torchscript)
        except (EncoderWeightsError, ValueError) as e:
            raise as_usage_error(e) from e
    try:
        # the exporters report progress on stdout, which carries the metadata
        with contextlib.redirect_stdout(sys.stderr):
            paths = export(stylizer, args.out, args.format, graphs, clip=clip, dtype=args.dtype,
                           batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                           noise_inputs=args.noise_inputs, device=args.device, source_checkpoint=args.ckpt,
                           clip_weights=args.clip_weights)
    except ExportError as e:
        raise as_usage_error(e) from e
    report = [{"file": str(path), "bytes": path.stat().st_size, "metadata": read_metadata(path)}
              for path in paths.values()]
    print(json.dumps(report, indent=2))
    err(f"wrote {', '.join(str(p) for p in paths.values())}")
    return EXIT_OK
