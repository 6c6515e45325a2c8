"""The ``mmfs-fast`` command: stylize, info, convert, demo, and the subcommands of optional
modules (finetune, video, bench, serve).

Exit codes: 0 everything worked, 1 some inputs failed (each reported on stderr, the
rest were written), 2 usage errors (bad options, unusable weights: nothing ran).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import random
import sys
from pathlib import Path

from mmfs_fast.commands.common import (EXIT_OK, EXIT_SOME_FAILED, UsageError, add_model_options, add_trust_options,
                                       as_usage_error, err, expand_inputs, load_mmfs, style_args)
from mmfs_fast.errors import MMFSError
from mmfs_fast.models.noise import NOISE_MODES

# subcommands that other modules provide through ``add_cli_parser(subparsers)``:
# name → (module, help, pip extra that brings its dependencies)
OPTIONAL_SUBCOMMANDS = {
    "finetune": ("mmfs_fast.finetune", "adapt a checkpoint's decoder to a text prompt or a reference image", "clip"),
    "video": ("mmfs_fast.video", "stylize the faces of a video (needs the 'faces' extra)", "faces"),
    "bench": ("mmfs_fast.benchmark", "quick end-to-end latency/throughput report on this machine", "clip"),
    "train": ("mmfs_fast.train.cli", "train MMFS stage I, II or III (torchrun for several GPUs)", "train"),
    "serve": ("mmfs_fast.serve", "HTTP stylization service (FastAPI on uvicorn; needs the 'serve' extra)",
              "serve"),
    "export": ("mmfs_fast.export", "export to ONNX or an AOTInductor package, for use outside Python", "export"),
    "eval": ("mmfs_fast.evaluation", "quality metrics: FID, ArcFace distance, LPIPS diversity, CLIP scores", "clip"),
}


# -- stylize ----------------------------------------------------------------------
def add_stylize_parser(sub) -> None:
    from mmfs_fast.faces import add_align_options

    p = sub.add_parser("stylize", help="stylize face images (files, folders, globs) into PNGs",
                       description="Stylize faces. One style per run: --seed (default: random), --text or "
                                   "--ref; --seed also fixes the noise of text/ref styles.")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--out", required=True, help="output folder (PNG files, named after the inputs)")
    add_model_options(p)
    style = p.add_mutually_exclusive_group()
    style.add_argument("--text", help="text prompt style (needs CLIP)")
    style.add_argument("--ref", help="reference image style (needs CLIP)")
    p.add_argument("--seed", type=int, help="random style seed (and noise seed)")
    p.add_argument("--noise", default="random", choices=NOISE_MODES,
                   help="random: one draw per face (default); fixed: one draw for every face; zero: no noise")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-pixels", type=int,
                   help="reject larger input images (default $MMFS_FAST_MAX_PIXELS or 50,000,000)")
    add_align_options(p)
    p.set_defaults(func=run_stylize)


def run_stylize(args) -> int:
    from mmfs_fast import atomic, faces, io

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if (args.text or args.ref) and not (args.clip_weights or args.random_init):
        raise UsageError("--text and --ref need CLIP: pass --clip-weights ViT-B-32.pt")
    if args.paste_back and not args.align:
        raise UsageError("--paste-back pastes aligned faces back: it needs --align")
    files = expand_inputs(args.inputs)
    if not files:
        raise UsageError("no input images found")
    out_dir = atomic.make_dirs(args.out)  # an unwritable --out fails before any work
    if args.align:
        return faces.run_stylize_align(args, files)
    mmfs = load_mmfs(args)
    style = style_args(args)
    try:
        w_plus = mmfs.style(**style)
    except (ValueError, RuntimeError) as e:  # the --ref image (ImageError); a checkpoint without clip_mapper
        raise as_usage_error(e) from e
    failed = 0
    results = mmfs.stylize_iter([file for file, _ in files], seed=style["seed"], w_plus=w_plus, noise=args.noise,
                                batch_size=args.batch_size, progress=True, skip_errors=True)
    for index, result in results:
        if isinstance(result, io.ImageError):
            failed += 1
            err(f"error: {result.cli_message()}")
        else:
            io.save_image(result, out_dir / f"{files[index][1]}.png")
    err(f"wrote {len(files) - failed} image(s) to {out_dir}" + (f"; {failed} failed" if failed else ""))
    return EXIT_SOME_FAILED if failed else EXIT_OK


# -- info -------------------------------------------------------------------------
def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="print versions, build flags and available op backends as JSON")
    p.set_defaults(func=run_info)


def build_report() -> dict:
    import torch

    import mmfs_fast
    from mmfs_fast import ops
    from mmfs_fast.ops import _backend

    from mmfs_fast.loading import default_device

    default = default_device()
    extension = _backend.cuda_extension()
    build_info = extension.build_info() if hasattr(extension, "build_info") else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "version": mmfs_fast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": extension is not None,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # architectures the extension was compiled for (null when it is not built), then torch's own
        "cuda_arch_list": build_info["arch_list"].split(";") if build_info else None,
        "torch_cuda_arch_list": torch.cuda.get_arch_list() if torch.version.cuda else [],
        "build_info": build_info,
        "cuda_extension": ops.cuda_extension_report(),
        "triton": triton_version,
        "backends": ops.backends(),
        # what --impl auto will run on this machine's default device, and why the others cannot
        "default_device": str(default),
        "op_backends": ops.backend_plan(default),
        "next_step": ("run on the GPU: the fastest backends above are used automatically" if torch.cuda.is_available()
                      else "no CUDA GPU here: everything runs on the CPU (ref); for speed run on a machine with an "
                           "NVIDIA GPU and a CUDA build of torch"),
    }


def run_info(args) -> int:
    print(json.dumps(build_report(), indent=2, default=str))
    return EXIT_OK


# -- convert ----------------------------------------------------------------------
def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an official MMFS / StyleGAN2 checkpoint to safetensors, or back",
                       description="official .pt/.pth (G_ema_model), bare Stylizer state dict or StyleGAN2 "
                                   "checkpoint → mmfs_fast safetensors; --to official writes a .pt with "
                                   "G_ema_model instead. Only the generator (G_ema) is converted.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["safetensors", "official"], default="safetensors")
    add_trust_options(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from mmfs_fast import atomic
    from mmfs_fast.models import Stylizer

    try:
        model = Stylizer.from_checkpoint(args.src, allow_cast=args.allow_cast)
    except (TypeError, ValueError) as e:
        raise as_usage_error(e) from e
    if args.to == "official":
        atomic.save_torch({"G_ema_model": model.official_state_dict()}, args.dst)
    else:
        model.save(args.dst)
    err(f"wrote {args.dst} ({args.to}, {model.config})")
    return EXIT_OK


# -- demo -------------------------------------------------------------------------
DEMO_PROMPT = "a watercolor portrait"


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end run without any weights: synthetic faces, random model",
                       description="Generate synthetic face images, stylize them with a few seeds using a "
                                   "random-initialised Stylizer (or --ckpt), and write PNGs plus a grid.")
    p.add_argument("--out", default="out", help="output folder (default ./out)")
    p.add_argument("--size", type=int, default=512, help="model and image size for a random model (default 512)")
    p.add_argument("--faces", type=int, default=3, help="number of synthetic faces")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--with-clip", action="store_true", help=f"also a text style ({DEMO_PROMPT!r}) through CLIP")
    p.add_argument("--batch-size", type=int, default=2)
    add_model_options(p)
    p.set_defaults(func=run_demo, random_init=None)


def synthetic_face(size: int, rng: random.Random):
    """A procedural face: background, hair, skin ellipse, eyes, brows, nose, mouth."""
    from PIL import Image, ImageDraw

    def box(cx, cy, rx, ry):
        return [size * (cx - rx), size * (cy - ry), size * (cx + rx), size * (cy + ry)]

    def jitter(base, spread):
        return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in base)

    img = Image.new("RGB", (size, size), jitter((120, 150, 190), 60))
    draw = ImageDraw.Draw(img)
    skin = jitter(rng.choice([(241, 194, 160), (224, 172, 120), (198, 134, 96), (141, 85, 56)]), 12)
    draw.ellipse(box(0.5, 0.43, 0.30, 0.30), fill=jitter((60, 40, 25), 40))  # hair
    draw.rectangle(box(0.5, 0.88, 0.12, 0.14), fill=skin)  # neck
    draw.ellipse(box(0.5, 0.52, 0.24, 0.31), fill=skin)
    eye_y, eye_dx = 0.46 + rng.uniform(-0.02, 0.02), 0.095 + rng.uniform(-0.01, 0.01)
    iris = jitter(rng.choice([(70, 110, 160), (90, 60, 30), (60, 120, 70)]), 20)
    for side in (-1, 1):
        cx = 0.5 + side * eye_dx
        draw.ellipse(box(cx, eye_y, 0.05, 0.025), fill=(245, 245, 245))
        draw.ellipse(box(cx, eye_y, 0.022, 0.022), fill=iris)
        draw.ellipse(box(cx, eye_y, 0.009, 0.009), fill=(15, 15, 15))
        brow = box(cx, eye_y - 0.055, 0.05, rng.uniform(-0.01, 0.01))
        draw.line(brow, fill=(60, 40, 30), width=max(1, size // 80))
    shade = tuple(int(c * 0.85) for c in skin)
    draw.polygon([(size * 0.5, size * 0.50), (size * 0.47, size * 0.60), (size * 0.53, size * 0.60)], fill=shade)
    mouth_open = rng.uniform(0.01, 0.05)
    draw.chord(box(0.5, 0.68, 0.08, mouth_open), 0, 180, fill=jitter((170, 60, 70), 20))
    return img


def run_demo(args) -> int:
    from mmfs_fast import atomic, io
    from mmfs_fast.models import StylizerConfig

    from mmfs_fast.validation import check_seed

    if args.faces < 1 or args.batch_size < 1:
        raise UsageError("--faces and --batch-size must be >= 1")
    for seed in args.seeds:
        try:
            check_seed(seed)
        except ValueError as e:
            raise UsageError(f"--seeds: {e}") from None
    args.random_init = args.ckpt is None or (args.with_clip and args.clip_weights is None)
    try:
        config = StylizerConfig(size=args.size) if args.ckpt is None else None
    except ValueError as e:
        raise UsageError(f"--size: {e}") from e
    out = Path(args.out)
    atomic.make_dirs(out / "inputs")  # an unwritable --out fails before the model is built
    mmfs = load_mmfs(args, config)
    rng = random.Random(0)
    face_paths = [out / "inputs" / f"face{i}.png" for i in range(args.faces)]
    for path in face_paths:
        atomic.save_pil(synthetic_face(mmfs.size, rng), path)
    styles = {f"seed{s}": {"seed": s} for s in args.seeds}
    if args.with_clip:
        styles["text"] = {"text": DEMO_PROMPT, "seed": 0}
    columns = [mmfs.load_faces(face_paths).float().cpu()]
    for name, style in styles.items():
        err(f"stylizing {len(face_paths)} faces with {name} …")
        images = mmfs.stylize(face_paths, batch_size=args.batch_size, progress=True, **style)
        for path, image in zip(face_paths, images):
            io.save_image(image, out / name / path.name)
        columns.append(images)
    # one row per face: the input, then each style
    grid = io.image_grid([col[i] for i in range(args.faces) for col in columns], columns=len(columns))
    io.save_image(grid, out / "grid.png")
    print(f"demo: inputs in {out / 'inputs'}, stylized faces in {', '.join(str(out / n) for n in styles)}; "
          f"grid (rows: faces; columns: input, {', '.join(styles)}) in {out / 'grid.png'}")
    return EXIT_OK


# -- main -------------------------------------------------------------------------
def add_optional_parser(sub, name: str, module_name: str, command: str | None) -> None:
    """A subcommand from an optional module. Only the module of the command being run is
    imported (they pull in heavy dependencies); running one whose dependencies are
    missing is a usage error that says what to install."""
    if importlib.util.find_spec(module_name) is None:
        return  # not part of this installation
    if name != command:
        sub.add_parser(name, help=OPTIONAL_SUBCOMMANDS[name][1], add_help=False)
        return
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"this subcommand needs a missing dependency ({e}); install it, e.g. "
                         f"pip install 'mmfs_fast[{OPTIONAL_SUBCOMMANDS[name][2]}]'") from e
    module.add_cli_parser(sub)


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the subcommand about to run) is the optional one to import."""
    parser = argparse.ArgumentParser(prog="mmfs-fast", description="Fast MMFS face stylization.",
                                     epilog="exit codes: 0 ok, 1 some inputs failed, 2 usage errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_stylize_parser, add_info_parser, add_convert_parser, add_demo_parser):
        add(sub)
    for name, (module_name, *_) in OPTIONAL_SUBCOMMANDS.items():
        add_optional_parser(sub, name, module_name, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = make_parser(command).parse_args(argv)
        return args.func(args)
    except MMFSError as e:  # bad options, unusable weights, unwritable outputs: one line, no traceback
        print(f"mmfs-fast {command}: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
