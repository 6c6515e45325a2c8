"""``mmfs-fast serve``: the app on uvicorn.

SIGTERM/SIGINT shut down gracefully: uvicorn stops accepting connections, lets the
requests in flight finish (at most the request timeout plus a margin), then the
engine finishes whatever it still holds and stops.

uvicorn has no timeout for a request's headers (the app only sees a request once they
are complete), so the header timeout lives here, in the connection's protocol; the body's
size and time limits are the app's (mmfs_fast.serve.app.BodyLimit), so that they hold
under Ray Serve too.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
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
                   help="seconds a request may wait for its result (504 after; its work not yet started is dropped)")
    p.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                   help="seconds a client may take to send a request's headers (408 and closed after)")
    p.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                   help="seconds a client may take to send a request's body after its headers (408 after)")
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
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from mmfs_fast.commands import common
    from mmfs_fast.models import CheckpointError
    from mmfs_fast.encoders import EncoderWeightsError
    from mmfs_fast.serve.app import ServeSettings, create_app

    if args.ckpt is None and not args.random_init:
        raise common.UsageError("no weights: pass --ckpt <MMFS checkpoint>, or --random-init for a random model")
    try:
        settings = ServeSettings(token=read_token(args.token_file), max_queue=args.max_queue,
                                 request_timeout=args.request_timeout, header_timeout=args.header_timeout,
                                 body_timeout=args.body_timeout,
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
    protocol = with_header_timeout(AutoHTTPProtocol, settings.header_timeout, app.state.client_aborts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=log_config(args.log_level),
                http=protocol, timeout_graceful_shutdown=int(settings.request_timeout) + SHUTDOWN_MARGIN_S)
    return common.EXIT_OK


def log_config(level: str) -> dict:
    """uvicorn's logging, with the service's own logger (mmfs_fast.serve) on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["mmfs_fast"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def with_header_timeout(base: type, timeout: float, aborts):
    """uvicorn's HTTP protocol class ``base`` with a header timeout: from the moment a
    connection opens or its previous response is complete, the next request's headers must
    arrive within ``timeout`` s. A client that sent part of them gets 408 (counted in
    ``aborts``); an idle connection is just closed."""
    log = logging.getLogger("mmfs_fast.serve")
    body = json.dumps({"error": f"the request headers were not received within {timeout:g} s"}).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    class HeaderTimeoutProtocol(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._header_timer = None
            self._partial = False  # bytes of a request's headers received since the timer was armed
            app = self.app

            async def headers_complete(scope, receive, send):
                self._disarm()
                await app(scope, receive, send)

            self.app = headers_complete

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is not None:
                self._partial = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._partial = False
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._partial:
                aborts.inc("header_timeout")
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("%s: the client did not send its request headers within %g s; closing the connection",
                         client, timeout)
                self.transport.write(response)
            self.transport.close()

    return HeaderTimeoutProtocol


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
