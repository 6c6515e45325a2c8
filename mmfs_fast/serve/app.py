"""The FastAPI app over :class:`mmfs_fast.engine.Engine`.

Requests go through the engine's micro-batcher (``Engine.submit``), so simultaneous
requests (and the faces of one photo) share runs. At most ``max_queue`` stylizations are
admitted at once; more get 503 with Retry-After. Every refusal is a JSON
``{"error": message}`` with a 4xx status (5xx only for the server's own failures: 503
busy/not ready, 504 timeout, 500 bug). The web page at / (static/) calls these endpoints.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io as _bytes_io
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mmfs_fast import faces, io
from mmfs_fast.api import MMFS
from mmfs_fast.encoders.clip import INPUT_SIZE as CLIP_INPUT_SIZE
from mmfs_fast.engine import Engine, LRUCache
from mmfs_fast.models import N_LATENT
from mmfs_fast.serve import metrics
from mmfs_fast.serve.inputs import RequestError, decode_image, read_payload, validate
from mmfs_fast.validation import SEED_LIMIT

log = logging.getLogger("mmfs_fast.serve")

MAX_TEXT_CHARS = 1000
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
MAX_FACES = 16  # per photo with align
STATIC_DIR = Path(__file__).parent / "static"
# the page loads only its own files and talks only to this service; no framing (clickjacking)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and options of the service (see ``mmfs-fast serve --help``)."""
    token: str | None = None  # bearer token; None: no authentication
    max_queue: int = 256  # stylizations admitted at once (uploading, decoding, queued or running)
    request_timeout: float = 30.0  # seconds a stylization may wait for its result
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers (uvicorn)
    body_timeout: float = 60.0  # seconds a client may take to send a request's body, from its headers
    retry_after: int = 1  # seconds, sent with 503
    max_upload_bytes: int = 16 * 2 ** 20  # per request body
    max_pixels: int = 25_000_000  # per uploaded image
    max_styles: int = 4096  # registered styles kept (least recently used dropped first)
    jpeg_quality: int = 95
    warmup: bool = True  # capture/compile the engine before /readyz says ready

    def __post_init__(self):
        for name in ("max_queue", "request_timeout", "header_timeout", "body_timeout", "max_upload_bytes",
                     "max_pixels", "max_styles"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the API token is empty")


# -- request bodies (validated here; documented in OpenAPI through _body_docs) --------------

class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StylizeFields(_Fields):
    """Plain fields of POST /v1/stylize; the files are ``image`` (required) and ``reference``."""
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="random style from this seed")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="text prompt style (needs CLIP)")
    style_id: str | None = Field(None, max_length=64, description="a style registered with POST /v1/styles")
    mix_seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="style mixing: a second style from this "
                                 "seed (with crossover)")
    mix_text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="style mixing: a second style "
                                 "from this prompt (needs CLIP)")
    mix_style_id: str | None = Field(None, max_length=64, description="style mixing: a registered second style")
    crossover: int | None = Field(None, ge=0, le=N_LATENT, description="style mixing (MMFS.mix): the w+ slots "
                                  f"below it from the style, the rest (of {N_LATENT}) from the second style")
    noise: Literal["zero", "random"] = Field("zero", description="zero: deterministic output")
    align: bool = Field(False, description="image is a photo: find every face (dlib), align and stylize each "
                                           "(needs the faces extra on the server)")
    paste_back: bool = Field(False, description="with align: the photo with the stylized faces pasted in "
                                                "(without: the stylized faces side by side, left to right)")
    format: Literal["png", "jpeg", "json"] = Field("png", description="json: {image: base64 PNG, ...}")


class StyleFields(_Fields):
    """Plain fields of POST /v1/styles; the file is ``reference``."""
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="text prompt (needs CLIP)")


def _body_docs(fields: type[BaseModel], files: dict[str, str], required: list[str]) -> dict:
    """OpenAPI requestBody: the same fields as multipart (files binary) or JSON (files base64)."""
    def schema(file_schema: dict) -> dict:
        s = fields.model_json_schema()
        s["properties"].update({name: {**file_schema, "description": doc} for name, doc in files.items()})
        return {**s, "required": required}

    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": schema({"type": "string", "format": "binary"})},
        "application/json": {"schema": schema({"type": "string", "contentEncoding": "base64"})}}}}


def _text(value: str | None, name: str = "text") -> str | None:
    if value is not None and not value.strip():
        raise RequestError(422, f"{name}: must not be empty")
    return value


# -- the service ----------------------------------------------------------------------------

class Service:
    """The engine plus registered styles, admission control and metrics."""

    def __init__(self, engine: Engine, settings: ServeSettings, aborts: metrics.Counter):
        self.engine, self.settings, self.aborts = engine, settings, aborts
        self.styles = LRUCache(settings.max_styles)
        self.ready = threading.Event()
        self._detector: faces.FaceDetector | None = None
        self._detector_lock = threading.Lock()
        self.warmup_error: str | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self.requests = metrics.Counter("mmfs_fast_requests_total", "HTTP requests by route and status",
                                        ("route", "status"))
        self.latency = metrics.Histogram("mmfs_fast_request_duration_seconds", "HTTP request latency by route",
                                         LATENCY_BUCKETS, ("route",))
        self.faces = metrics.Counter("mmfs_fast_faces_total", "faces submitted to the engine, by outcome: "
                                     "rendered, failed, or cancelled (their request timed out before the "
                                     "engine took them; never computed)", ("outcome",))

    # admission: a bounded number of stylizations at once
    def admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.settings.max_queue:
                raise RequestError(503, "the server is busy (request queue full); retry later",
                                   {"Retry-After": str(self.settings.retry_after)})
            self._in_flight += 1

    def release(self, _future: Future | None = None) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def check_clip(self) -> None:
        if self.engine.clip is None or self.engine.model.clip_mapper is None:
            raise RequestError(400, "text and reference styles are not available: the server runs without "
                                    "CLIP (start it with --clip-weights) or its checkpoint has no clip_mapper")

    def load_reference(self, data: bytes, name: str = "reference") -> torch.Tensor:
        return io.pil_to_tensor(decode_image(data, name, self.settings.max_pixels), CLIP_INPUT_SIZE)

    def load_face(self, data: bytes) -> torch.Tensor:
        return io.pil_to_tensor(decode_image(data, "image", self.settings.max_pixels), self.engine.config.size)

    def load_photo(self, data: bytes) -> tuple[np.ndarray, list[faces.Face], torch.Tensor]:
        """The photo (H, W, 3) uint8, its faces and their aligned crops (N, 3, S, S)."""
        photo = faces.as_rgb_array(decode_image(data, "image", self.settings.max_pixels))
        with self._detector_lock:  # one dlib detector, created on first use, used by one thread at a time
            if self._detector is None:
                try:
                    self._detector = faces.FaceDetector()
                except faces.FacesUnavailable as e:
                    raise RequestError(400, f"align: not available on this server ({e})") from None
            found = self._detector(photo)
        if not found:
            raise RequestError(422, "image: no face found (the detector finds frontal faces of about 40 px "
                                    "and more; send an aligned face without align)")
        if len(found) > MAX_FACES:
            raise RequestError(422, f"image: {len(found)} faces found, at most {MAX_FACES} per photo")
        return photo, found, faces.align(photo, [f.quad for f in found], self.engine.config.size)

    def submit(self, crops: torch.Tensor, style, noise: str, style_key=None) -> Future:
        """One Future of the (N, 3, S, S) stylized crops: each crop is its own engine request,
        so they share micro-batches. Cancelling it cancels the crops the engine has not taken
        yet. The admission is released once every crop is settled (a crop being computed
        still occupies the engine after its request has given up)."""
        parts: list[Future] = []
        try:
            for crop in crops:
                parts.append(self.engine.submit(crop, style, noise, style_key))
        except BaseException:
            for part in parts:
                part.cancel()
            raise
        combined: Future = Future()
        pending, lock = [len(parts)], threading.Lock()

        def part_done(part: Future) -> None:
            self.faces.inc("cancelled" if part.cancelled() else "failed" if part.exception() else "rendered")
            with lock:
                pending[0] -= 1
                if pending[0]:
                    return
            self.release()
            if not combined.set_running_or_notify_cancel():
                return  # the request gave up
            try:
                combined.set_result(torch.stack([part.result().float().cpu() for part in parts]))
            except BaseException as e:
                combined.set_exception(e)

        def cancel_parts(future: Future) -> None:
            if future.cancelled():
                for part in parts:
                    part.cancel()

        combined.add_done_callback(cancel_parts)
        for part in parts:
            part.add_done_callback(part_done)
        return combined

    def w_plus(self, style, style_key=None) -> torch.Tensor:
        """The (10, D) w+ of an engine style argument (see :meth:`Engine.submit`)."""
        if isinstance(style, int):
            return self.engine.style_from_seed(style)[0]
        if isinstance(style, str):
            return self.engine.style_from_text(style)[0]
        if style.ndim == 2:  # registered
            return style
        return self.engine.style_from_image(style[None], keys=None if style_key is None else [style_key])[0]

    def mixed(self, first, first_key, second, second_key, crossover: int) -> torch.Tensor:
        try:
            w_a, w_b = self.w_plus(first, first_key), self.w_plus(second, second_key)
        except (ValueError, TypeError) as e:  # the engine's input checks
            raise RequestError(400, str(e)) from None
        return MMFS.mix(w_a[None], w_b[None], crossover)[0]

    def registered(self, style_id: str) -> torch.Tensor:
        w_plus = self.styles.get(style_id)
        if w_plus is None:
            raise RequestError(404, f"style_id: unknown style {style_id!r} (register it with POST /v1/styles)")
        return w_plus

    async def result(self, future: Future) -> torch.Tensor:
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.settings.request_timeout)
        except asyncio.TimeoutError:
            future.cancel()  # its faces that still wait for the engine are never computed
            raise RequestError(504, f"no result within {self.settings.request_timeout} s") from None
        except (ValueError, TypeError) as e:  # the engine's input checks
            raise RequestError(400, str(e)) from None

    def encode(self, pil: Image.Image, fmt: str, headers: dict[str, str]) -> Response:
        buffer = _bytes_io.BytesIO()
        if fmt == "jpeg":
            pil.save(buffer, format="JPEG", quality=self.settings.jpeg_quality)
        else:
            pil.save(buffer, format="PNG")
        if fmt == "json":
            return JSONResponse({"image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "media_type": "image/png", "width": pil.width, "height": pil.height},
                                headers=headers)
        return Response(buffer.getvalue(), media_type=MEDIA_TYPES[fmt], headers=headers)

    def render_metrics(self) -> str:
        queue = self.engine.queue_stats()
        batches = metrics.Histogram("mmfs_fast_batch_size", "requests per engine micro-batch", BATCH_BUCKETS)
        for size, count in queue["batch_sizes"].items():
            batches.observe(size, times=count)
        lines = (self.requests.render() + self.latency.render() + batches.render() + self.faces.render()
                 + self.aborts.render())
        lines += metrics.gauge("mmfs_fast_queue_depth", "requests waiting for an engine micro-batch",
                               queue["queued"])
        lines += metrics.gauge("mmfs_fast_requests_in_flight", "stylizations admitted and not finished",
                               self.in_flight)
        lines += metrics.gauge("mmfs_fast_registered_styles", "styles registered with POST /v1/styles",
                               len(self.styles))
        lines += metrics.gauge("mmfs_fast_ready", "1 once the engine is warmed up", int(self.ready.is_set()))
        memory = self.engine.memory_stats()
        for key in ("cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_max_allocated_bytes"):
            if key in memory:
                lines += metrics.gauge(f"mmfs_fast_{key}", f"torch.cuda {key.removeprefix('cuda_')} on the "
                                       "engine's device", memory[key])
        return "\n".join(lines) + "\n"


def style_id_of(kind: str, content: bytes) -> str:
    """Registering the same style twice gives the same id."""
    return f"{kind}-" + hashlib.blake2b(content, digest_size=12, person=b"mmfs-style").hexdigest()


# -- the app --------------------------------------------------------------------------------

def new_abort_counter() -> metrics.Counter:
    return metrics.Counter("mmfs_fast_client_aborts_total", "requests the client did not finish sending: "
                           "disconnected mid-upload, or too slow with its headers or body (408)", ("reason",))


class BodyLimit:
    """ASGI middleware: request bodies above ``max_bytes`` get 413, checked on the declared
    Content-Length (before a byte of the body is read) and again on the bytes actually
    received (chunked uploads); a body not received within ``timeout`` seconds of the
    headers gets 408 and the connection is closed."""

    def __init__(self, app, max_bytes: int, timeout: float, aborts: metrics.Counter):
        self.app, self.max_bytes, self.timeout, self.aborts = app, max_bytes, timeout, aborts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        received, complete = 0, False
        deadline = time.monotonic() + self.timeout

        async def limited_receive():
            nonlocal received, complete
            if complete:  # later receives only wait for the client to disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                self.aborts.inc("body_timeout")
                log.info("%s %s: the client did not send its body within %g s; closing the connection",
                         _client(scope), scope["path"], self.timeout)
                raise RequestError(408, f"the request body was not received within {self.timeout:g} s",
                                   {"Connection": "close"}) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestError(413, self._message())
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body exceeds the limit of {self.max_bytes} bytes"

    async def _too_large(self, scope, receive, send):
        await JSONResponse({"error": self._message()}, status_code=413)(scope, receive, send)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


def create_app(make_engine: Callable[[], Engine], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The app; ``make_engine`` runs at startup (in a worker thread) and the engine is
    warmed up in the background, /readyz answering 503 until it is done. The engine is
    closed at shutdown, after it has finished every submitted request. ``app.state.client_aborts``
    counts the requests clients did not finish sending (the server's header timeout adds to it)."""
    aborts = new_abort_counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await run_in_threadpool(make_engine)
        service = app.state.service = Service(engine, settings, aborts)
        warmup = asyncio.create_task(run_in_threadpool(_warm_up, service))
        try:
            yield
        finally:
            await warmup
            await run_in_threadpool(engine.close)

    app = FastAPI(title="mmfs_fast", version="1", lifespan=lifespan,
                  description="Face stylization (MMFS) over HTTP. Send faces as multipart uploads or base64 JSON.")
    app.state.client_aborts = aborts
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, timeout=settings.body_timeout, aborts=aborts)
    _install_error_handlers(app)
    _install_metrics(app)
    auth = _auth_dependency(settings.token)
    _add_routes(app, auth)
    return app


def _warm_up(service: Service) -> None:
    try:
        if service.settings.warmup:
            service.engine.warmup()
    except Exception as e:  # e.g. a CLIP whose width the checkpoint's clip_mapper does not take
        log.exception("warm-up failed; the server stays not ready")
        service.warmup_error = f"warm-up failed: {e}"
        return
    service.ready.set()


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _error(422, "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):
        # the client's choice, not the server's failure: one line, no traceback
        request.app.state.client_aborts.inc("disconnect")
        log.info("%s %s: the client disconnected before sending its whole body", _client(request.scope),
                 request.url.path)
        return _error(499, "client closed the request")  # nginx's code; nobody receives it

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal server error")


def _install_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"  # bounded label values
        service: Service | None = getattr(request.app.state, "service", None)
        if service is not None:
            service.requests.inc(path, str(response.status_code))
            service.latency.observe(time.perf_counter() - start, path)
        return response


def _auth_dependency(token: str | None):
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
    expected = token.encode() if token is not None else None

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise RequestError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})

    return Depends(check)


def _service(request: Request) -> Service:
    return request.app.state.service


def _add_routes(app: FastAPI, auth) -> None:
    image_responses = {200: {"content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
                             "description": "the stylized face at the model's resolution (with align: the "
                                            "faces side by side, or the photo with paste_back); header "
                                            "Server-Timing: render;dur=<ms>, with align X-Faces: <count>"}}

    @app.get("/", include_in_schema=False)
    async def page():
        """The web page (static/): it calls the endpoints below, with the same auth."""
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["ops"], summary="liveness: the process serves requests")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="readiness: the engine is loaded and warmed up")
    async def readyz(request: Request):
        service = getattr(request.app.state, "service", None)
        if service is None or not service.ready.is_set():
            return _error(503, (service and service.warmup_error) or "warming up", {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", dependencies=[auth],
             response_class=Response)
    async def prometheus(request: Request):
        text = await run_in_threadpool(_service(request).render_metrics)
        return Response(text, media_type=metrics.CONTENT_TYPE)

    @app.post("/v1/stylize", tags=["stylize"], dependencies=[auth], responses=image_responses,
              summary="stylize a face with a seed, text, reference image or registered style, optionally mixed "
                      "with a second one (crossover)",
              openapi_extra=_body_docs(StylizeFields, {"image": "the face (aligned crop), or a photo with align",
                                                       "reference": "reference image style (needs CLIP)",
                                                       "mix_reference": "style mixing: a second style from a "
                                                                        "reference image (needs CLIP)"},
                                       ["image"]))
    async def stylize(request: Request):
        service = _service(request)
        # admitted (like authenticated and size-checked) before a byte of the body is read:
        # a refusal costs the client only its headers
        service.admit()
        photo = found = None
        try:
            fields, files = await read_payload(request, ("image", "reference", "mix_reference"))
            options = validate(StylizeFields, fields)
            if "image" not in files:
                raise RequestError(422, "image: required (the face to stylize)")
            sources = [name for name, value in (("seed", options.seed), ("text", options.text),
                                                ("style_id", options.style_id),
                                                ("reference", files.get("reference"))) if value is not None]
            if len(sources) != 1:
                raise RequestError(422, "give exactly one style: seed, text, style_id or reference"
                                   + (f" (got {', '.join(sources)})" if sources else ""))
            if options.paste_back and not options.align:
                raise RequestError(422, "paste_back: needs align (it pastes the faces found in a photo back)")
            mixes = [name for name, value in (("mix_seed", options.mix_seed), ("mix_text", options.mix_text),
                                              ("mix_style_id", options.mix_style_id),
                                              ("mix_reference", files.get("mix_reference"))) if value is not None]
            if len(mixes) > 1:
                raise RequestError(422, f"give at most one second style to mix with (got {', '.join(mixes)})")
            if mixes and options.crossover is None:
                raise RequestError(422, f"crossover: required with {mixes[0]} (0 to {N_LATENT}: the w+ slots "
                                        "below it come from the style, the rest from the second style)")
            if options.crossover is not None and not mixes:
                raise RequestError(422, "crossover: needs a second style to mix with: mix_seed, mix_text, "
                                        "mix_style_id or mix_reference")
            if options.align:
                photo, found, crops = await run_in_threadpool(service.load_photo, files["image"])
            else:
                crops = (await run_in_threadpool(service.load_face, files["image"]))[None]
            style = await _style(service, options.seed, options.text, options.style_id, files.get("reference"))
            # a reference is cached by its upload's bytes, hashed here on the host
            style_key = style_id_of("ref", files["reference"]) if "reference" in files else None
            if options.crossover is not None:
                second = await _style(service, options.mix_seed, options.mix_text, options.mix_style_id,
                                      files.get("mix_reference"), prefix="mix_")
                second_key = style_id_of("ref", files["mix_reference"]) if "mix_reference" in files else None
                style = await run_in_threadpool(service.mixed, style, style_key, second, second_key,
                                                options.crossover)
                style_key = None
            start = time.perf_counter()
            future = service.submit(crops, style, options.noise, style_key)  # it releases the admission
        except BaseException:
            service.release()
            raise
        stylized = await service.result(future)
        # the page shows this as the time per image (queueing in the micro-batcher included)
        headers = {"Server-Timing": f"render;dur={(time.perf_counter() - start) * 1000:.1f}"}
        if found is not None:
            headers["X-Faces"] = str(len(found))

        def respond() -> Response:
            return service.encode(_picture(stylized, photo, found, options.paste_back), options.format, headers)

        return await run_in_threadpool(respond)

    @app.post("/v1/styles", tags=["stylize"], dependencies=[auth], status_code=201,
              summary="register a text or reference-image style; its w+ is computed once and cached",
              openapi_extra=_body_docs(StyleFields, {"reference": "reference image (needs CLIP)"}, []))
    async def register_style(request: Request):
        service = _service(request)
        service.admit()  # before the body, as for /v1/stylize
        try:
            fields, files = await read_payload(request, ("reference",))
            text = _text(validate(StyleFields, fields).text)
            if (text is None) == ("reference" not in files):
                raise RequestError(422, "give exactly one of text or reference")
            service.check_clip()
            if text is not None:
                style_id = style_id_of("text", text.encode())
                compute = lambda: service.engine.style_from_text(text)  # noqa: E731
            else:
                reference = await run_in_threadpool(service.load_reference, files["reference"])
                style_id = style_id_of("ref", reference.numpy().tobytes())
                compute = lambda: service.engine.style_from_image(reference[None])  # noqa: E731
            if service.styles.get(style_id) is None:
                service.styles.put(style_id, (await run_in_threadpool(compute))[0])
        finally:
            service.release()
        return JSONResponse({"style_id": style_id, "kind": "text" if text is not None else "reference"},
                            status_code=201)


def _picture(stylized: torch.Tensor, photo: np.ndarray | None, found: list[faces.Face] | None,
             paste_back: bool) -> Image.Image:
    """The response image: the one stylized face; or of a photo, the faces side by side or pasted back."""
    if photo is None:
        return io.to_pil(stylized[0])
    if paste_back:
        return Image.fromarray(faces.paste_back(photo, stylized, [face.quad for face in found]))
    return io.to_pil(torch.cat(list(stylized), dim=-1))


async def _style(service: Service, seed: int | None, text: str | None, style_id: str | None,
                 reference: bytes | None, prefix: str = ""):
    """The engine's style argument of the one source given: a seed, a prompt, a reference
    tensor or a registered w+ (``prefix``: of the fields' names, in messages)."""
    if seed is not None:
        return seed
    if style_id is not None:
        return service.registered(style_id)
    service.check_clip()
    if text is not None:
        return _text(text, f"{prefix}text")
    return await run_in_threadpool(service.load_reference, reference, f"{prefix}reference")
