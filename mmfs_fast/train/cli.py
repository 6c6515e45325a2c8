"""``mmfs-fast train``: every TrainConfig setting as a flag, optionally on top of a
YAML/JSON config file. Data-parallel: ``torchrun --nproc_per_node N -m mmfs_fast.train ...``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from mmfs_fast.train.config import TrainConfig, make_config

from mmfs_fast.errors import EXIT_OK, EXIT_USAGE, MMFSError

HELP = {
    "stage": "1: encoder (from a StyleGAN2 teacher), 2: stylization GAN, 3: CLIP mapper",
    "out_dir": "folder for latest.pt, stylizer.safetensors, losses.csv and samples/",
    "init": "stage 1: rosinality StyleGAN2 checkpoint (g_ema, d); stages 2/3: latest.pt of the previous stage",
    "face_dir": "folder of face images (recursive), stages 2 and 3",
    "art_dir": "folder of target-style images (recursive), stage 2",
    "random_init": "random teacher/DINO/CLIP instead of weight files (tests and smoke runs only)",
    "trust_torchscript": "accept CLIP weights that are a TorchScript archive (loading one runs the code inside)",
    "resume": "continue the run in --out-dir from its latest.pt",
    "steps": "iterations (default: the paper's 10k / 90k / 60k)",
    "batch_size": "images per process per step",
    "lr": "Adam learning rate (default 1e-3 for stages 1-2, 2e-4 for stage 3)",
    "augment": "comma-separated discriminator augmentations for small art sets: color,translation,cutout",
    "amp": "bf16 autocast on GPUs",
    "impl": "op backend: auto, ref, cuda or triton",
    "device": "cuda or cpu (default: cuda when available)",
}


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        help_text = HELP.get(field.name, "") + f" (default: {field.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.name == "augment":
            parser.add_argument(flag, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text,
                                choices=(1, 2, 3) if field.name == "stage" else None)


def add_cli_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``mmfs-fast`` subcommand parsers."""
    parser = subparsers.add_parser("train", help="train MMFS stage 1, 2 or 3",
                                   description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from mmfs_fast.train.trainer import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = make_config(args.config, **overrides)
        latest = train(cfg)
    except MMFSError as e:  # checkpoints, weights, images, unwritable out_dir
        print(f"mmfs-fast train: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileExistsError) as e:
        print(f"mmfs-fast train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    print(f"mmfs-fast train: stage {cfg.stage} done; checkpoint {latest}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfs_fast.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
