"""What the commands share (the ``mmfs-fast`` CLI, finetune, video, faces, serve): exit
codes, usage errors, messages on stderr, input expansion, the model options and loading.

Exit codes: 0 everything worked, 1 some inputs failed (each reported on stderr, the
rest were written), 2 usage errors (bad options, unusable weights: nothing ran).
"""
from __future__ import annotations

import argparse
import glob
import random
import sys
import warnings
from pathlib import Path

from mmfs_fast.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, MMFSError, UsageError, as_usage_error  # noqa: F401

RANDOM_INIT_BANNER = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! RANDOM-INITIALISED WEIGHTS: whatever has no weights file (the Stylizer,    !!
!! CLIP, DINO) is random, so the outputs are noise-like and meaningless. This !!
!! only shows the pipeline runs. For real results pass --ckpt <MMFS           !!
!! checkpoint>, --clip-weights ViT-B-32.pt (text/reference styles, finetune)  !!
!! and --dino-weights dino_vitbase8_pretrain.pth (finetune, training).        !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def err(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # keeps an active progress bar intact


# -- input files ------------------------------------------------------------------
def expand_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, output name without suffix) for every file, folder (recursive) or glob;
    a path that does not exist is kept, to be reported as missing."""
    from mmfs_fast.io import IMAGE_SUFFIXES

    found = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, p.relative_to(path).with_suffix("")) for p in files]
        elif not path.exists() and glob.has_magic(arg):
            matches = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            if not matches:
                err(f"warning: {arg}: no files match")
            found += [(p, Path(p.stem)) for p in matches]
        else:
            found.append((path, Path(path.stem)))
    return _unique_names(found)


def _unique_names(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """Drop repeated files; number repeated output names (face, face-2, face-3)."""
    seen_files, used, out = set(), {}, []
    for file, name in found:
        if file.resolve() in seen_files:
            continue
        seen_files.add(file.resolve())
        key = str(name).lower()
        used[key] = used.get(key, 0) + 1
        out.append((file, name if used[key] == 1 else name.with_name(f"{name.name}-{used[key]}")))
    return out


# -- model loading ----------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="MMFS checkpoint: official .pt/.pth, StyleGAN2 .pt or mmfs_fast .safetensors")
    p.add_argument("--clip-weights", help="CLIP ViT-B/32 weights (OpenAI ViT-B-32.pt) for --text/--ref")
    p.add_argument("--random-init", action="store_true",
                   help="run without weights (random model, meaningless outputs): demos and tests only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", help="rendering precision: float32, float16 (CUDA) or bfloat16 "
                                   "(default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--impl", default="auto", choices=["auto", "ref", "cuda", "triton"], help="op backend")
    add_trust_options(p)


def add_trust_options(p: argparse.ArgumentParser) -> None:
    """What a weights file may be: --allow-cast (integer/bool weights) and --trust-torchscript."""
    p.add_argument("--allow-cast", action="store_true",
                   help="cast integer or bool weights to float32 instead of refusing the checkpoint")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="accept CLIP weights that are a TorchScript archive (loading one runs the code inside)")


def check_impl(impl: str, device: str | None) -> None:
    """An explicit --impl that cannot run on the device is a usage error naming the cause,
    before any model is built."""
    import torch

    from mmfs_fast.loading import default_device
    from mmfs_fast.ops._backend import why_not

    if impl == "auto":
        return
    try:
        target = torch.device(device) if device is not None else default_device()
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if why := why_not(impl, target):
        raise UsageError(f"--impl {impl}: {why}; use --impl auto (or ref)")


def load_mmfs(args, config=None):
    from mmfs_fast.api import MMFS

    if args.ckpt is None and not args.random_init:
        raise UsageError("no weights: pass --ckpt <MMFS checkpoint>, or --random-init to try the pipeline "
                         "with a random model")
    check_impl(args.impl, args.device)
    if args.random_init:
        err(RANDOM_INIT_BANNER)
        warnings.filterwarnings("ignore", message="mmfs_fast: RANDOM-INITIALISED")  # the banner said it
    try:
        mmfs = MMFS.load(args.ckpt, args.clip_weights, device=args.device, dtype=args.dtype, impl=args.impl,
                         random_init=args.random_init, config=config, allow_cast=args.allow_cast,
                         trust_torchscript=args.trust_torchscript)
    except (MMFSError, ValueError, RuntimeError, TypeError) as e:
        raise as_usage_error(e) from e
    mmfs.max_pixels = getattr(args, "max_pixels", None)
    return mmfs


def style_args(args) -> dict:
    from mmfs_fast.validation import check_seed

    if args.seed is not None:
        try:
            check_seed(args.seed)
        except ValueError as e:
            raise UsageError(f"--seed: {e}") from None
    if args.text is None and args.ref is None and args.seed is None:
        args.seed = random.randrange(2 ** 31)
        err(f"style: random seed {args.seed} (pass --seed {args.seed} to repeat it)")
    return {"seed": args.seed, "text": args.text, "ref": args.ref}
