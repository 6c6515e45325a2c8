"""``mmfs-fast serve``: the app on uvicorn.

SIGTERM/SIGINT shut down gracefully: uvicorn stops accepting connections, lets the
requests in flight finish (at most the request timeout plus a margin), then the
engine finishes whatever it still holds and stops.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

TOKEN_ENV = "MMFS_FAST_API_TOKEN"
SHUTDOWN_MARGIN_S = 5


def add_cli_parser(sub) -> None:
    """The ``serve`` subcommand (registered by mmfs_fast.cli)."""
    from mmfs_fast.commands import common
    from mmfs_fast.serve.app import ServeSettings

    defaults = ServeSettings()
    p = sub.add_parser("serve", help="HTTP stylization service (FastAPI on uvicorn; needs the 'serve' extra)",
                       description="Serve POST /v1/stylize, POST /v1/styles, /healthz, /readyz, /metrics and "
                                   "the OpenAPI docs (/docs).")
    common.add_model_options(p)
    p.set_defaults(dtype=None, func=run_server)  # the engine's default: fp16 on CUDA, fp32 on the CPU
    p.add_argument("--no-clip", action="store_true",
                   help="with --random-init: no random CLIP (seed and registered styles only; faster start)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", type=Path,
                   help=f"require 'Authorization: Bearer <token>' with the token in this file (or in ${TOKEN_ENV})")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="stylizations admitted at once; more get 503 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                   help="seconds a request may wait for its result (504 after)")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2 ** 20,
                   help="request body limit in MiB")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="pixel limit per uploaded image")
    p.add_argument("--max-styles", type=int, default=defaults.max_styles, help="registered styles kept")
    p.add_argument("--max-batch", type=int, help="micro-batch size limit (default: the largest bucket)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a micro-batch waits for more requests after its first")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly on CUDA")
    p.add_argument("--no-warmup", action="store_true", help="ready at once; graphs are captured on first use")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from --token-file, else from $MMFS_FAST_API_TOKEN, else None (no auth)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file: cannot read {token_file} ({e.strerror})") from None
        if not token:
            raise ValueError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def load_engine(ckpt=None, clip_weights=None, random_init=False, clip=True, device=None, precision=None,
                impl="auto", trust_torchscript=False, allow_cast=False, **engine_options):
    """The Engine of a checkpoint, with CLIP when ``clip_weights`` are given (or random
    with ``random_init``, unless ``clip=False``)."""
    import torch

    from mmfs_fast.engine import Engine
    from mmfs_fast.loading import default_device, load_clip, load_stylizer
    from mmfs_fast.precision import precision_name

    device = torch.device(device) if device is not None else default_device()
    # the Engine prepares its own low-precision copy from the fp32 weights
    stylizer = load_stylizer(ckpt, device, impl=impl, random_init=random_init, allow_cast=allow_cast)
    encoder = (load_clip(clip_weights, device, trust_torchscript=trust_torchscript)
               if clip_weights is not None or (random_init and clip) else None)
    precision = precision_name(precision) if precision is not None else None
    return Engine(stylizer, clip=encoder, precision=precision, device=device, impl=impl, **engine_options)


def run_server(args) -> int:
    import uvicorn

    from mmfs_fast.commands import common
    from mmfs_fast.models import CheckpointError
    from mmfs_fast.encoders import EncoderWeightsError
    from mmfs_fast.serve.app import ServeSettings, create_app

    if args.ckpt is None and not args.random_init:
        raise common.UsageError("no weights: pass --ckpt <MMFS checkpoint>, or --random-init for a random model")
    try:
        settings = ServeSettings(token=read_token(args.token_file), max_queue=args.max_queue,
                                 request_timeout=args.request_timeout,
                                 max_upload_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels,
                                 max_styles=args.max_styles, warmup=not args.no_warmup)
        if args.random_init:
            common.err(common.RANDOM_INIT_BANNER)
            warnings.filterwarnings("ignore", message="mmfs_fast: RANDOM-INITIALISED")
        engine = load_engine(args.ckpt, args.clip_weights, args.random_init, clip=not args.no_clip,
                             device=args.device, precision=args.dtype, impl=args.impl,
                             trust_torchscript=args.trust_torchscript, allow_cast=args.allow_cast,
                             cuda_graphs=not args.no_cuda_graphs, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms)
    except (CheckpointError, EncoderWeightsError, ValueError, RuntimeError, TypeError) as e:
        raise common.as_usage_error(e) from e
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        common.err(f"warning: serving on {args.host} without authentication (set ${TOKEN_ENV} or --token-file)")
    app = create_app(lambda: engine, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout) + SHUTDOWN_MARGIN_S)
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m mmfs_fast.serve [options]``: the same as ``mmfs-fast serve [options]``."""
    from mmfs_fast.commands import common

    parser = argparse.ArgumentParser(prog="python -m mmfs_fast.serve")
    add_cli_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except common.UsageError as e:
        print(f"mmfs-fast serve: error: {e}", file=sys.stderr)
        return common.EXIT_USAGE
