"""The HTTP service: real server processes (python -m mmfs_fast.serve) on free localhost
ports, driven with httpx. Expected images come from the plain Stylizer (the ref path)
with the style computed independently through mmfs_fast.api.MMFS."""
import asyncio
import base64
import io
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402

from mmfs_fast import io as mio  # noqa: E402
from mmfs_fast.api import MMFS  # noqa: E402
from mmfs_fast.models import Stylizer, StylizerConfig  # noqa: E402
from mmfs_fast.serve import ServeSettings, create_app, load_engine  # noqa: E402

TOKEN = "s3cret-token"
SIZE = 32
TEXT = "a watercolor portrait"


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    # style_dim 512: the clip_mapper takes CLIP's 512-wide embeddings
    Stylizer(StylizerConfig(size=SIZE, ngf=4, style_dim=512, n_mlp=2)).save(path)
    return path


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send the request line and headers (and ``body``, maybe only part of what they declare)
    on a socket, then read the answer: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return read_response(sock)


def read_response(sock) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(rest) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, *options, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmfs_fast.serve", "--ckpt", str(ckpt), "--port", str(self.port),
             "--log-level", "warning", *options],
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.proc.stdout.read()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server not ready in time")

    def client(self, token=None) -> "httpx.Client":
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same weights in this process: the Stylizer and the random CLIP (seeded as in MMFS)."""
    mmfs = MMFS.load(ckpt, random_init=True, engine=False, device="cpu")
    mmfs.clip  # built now, outside the timed requests
    return mmfs


def expected(mmfs: MMFS, face: bytes, w_plus: torch.Tensor) -> np.ndarray:
    x = mio.load_image(Image.open(io.BytesIO(face)), SIZE)[None]
    with torch.no_grad():
        out = mmfs.stylizer(x, w_plus=w_plus, noise="zero")
    return np.asarray(mio.to_pil(out[0]), dtype=np.int16)


def assert_same_image(got: np.ndarray, want: np.ndarray):
    # fp32 engine vs the Stylizer: equal up to one 8-bit rounding step
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1


@pytest.fixture(scope="module")
def main_server(ckpt, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    server = Server(ckpt, "--random-init", "--token-file", str(token_file), "--max-upload-mb", "0.25",
                    "--max-pixels", "40000")
    yield server
    server.stop()


# -- the main server: auth on, random CLIP ----------------------------------------------------

def test_ops_endpoints_and_auth(main_server):
    anonymous, wrong, authed = main_server.client(), main_server.client("nope"), main_server.client(TOKEN)
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").json() == {"status": "ready"}
    assert "/v1/stylize" in anonymous.get("/openapi.json").json()["paths"]
    assert anonymous.get("/docs").status_code == 200
    face = png(random_image(0))
    for client in (anonymous, wrong):
        r = client.post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "1"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "token" in r.json()["error"]
        assert client.get("/metrics").status_code == 401
    r = authed.post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    text = authed.get("/metrics").text
    assert 'mmfs_fast_requests_total{route="/v1/stylize",status="401"} 2' in text
    assert 'mmfs_fast_requests_total{route="/v1/stylize",status="200"}' in text
    for name in ("mmfs_fast_request_duration_seconds_bucket", "mmfs_fast_batch_size_count", "mmfs_fast_queue_depth",
                 "mmfs_fast_requests_in_flight", "mmfs_fast_ready 1"):
        assert name in text


def test_formats_and_styles(main_server, reference):
    client = main_server.client(TOKEN)
    face = png(random_image(1, 80))  # resized to the model's 32² like any upload
    want = expected(reference, face, reference.style_from_seed(5))
    r = client.post("/v1/stylize", json={"image": base64.b64encode(face).decode(), "seed": 5, "format": "json"})
    body = r.json()
    assert r.status_code == 200 and body["media_type"] == "image/png" and body["width"] == SIZE
    assert_same_image(decode(base64.b64decode(body["image"])), want)
    r = client.post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "5", "format": "jpeg"})
    assert r.headers["content-type"] == "image/jpeg"
    assert np.abs(decode(r.content) - want).mean() < 8  # lossy, but the same image

    first = client.post("/v1/styles", json={"text": TEXT})
    again = client.post("/v1/styles", files={"text": (None, TEXT)})  # multipart
    assert first.status_code == again.status_code == 201
    assert first.json()["style_id"] == again.json()["style_id"] and first.json()["kind"] == "text"
    ref = png(random_image(2, 100))
    registered = client.post("/v1/styles", files={"reference": ("r.png", ref)}).json()
    assert registered["kind"] == "reference"
    for style in ({"style_id": first.json()["style_id"]}, {"text": TEXT}):
        got = client.post("/v1/stylize", files={"image": ("f.png", face)}, data=style)
        assert_same_image(decode(got.content), expected(reference, face, reference.style_from_text(TEXT)))
    ref_w = reference.style_from_image(mio.pil_to_tensor(Image.open(io.BytesIO(ref)), 224)[None])
    for files, data in (({"reference": ("r.png", ref)}, {}), ({}, {"style_id": registered["style_id"]})):
        got = client.post("/v1/stylize", files={"image": ("f.png", face), **files}, data=data)
        assert_same_image(decode(got.content), expected(reference, face, ref_w))


def test_style_mixing_is_mmfs_mix(main_server, reference):
    """crossover c: w+ slots [0, c) of the style, the rest of the second one, as MMFS.mix."""
    client = main_server.client(TOKEN)
    face = png(random_image(6))
    seed5, seed9 = reference.style_from_seed(5), reference.style_from_seed(9)
    wants = {c: expected(reference, face, MMFS.mix(seed5, seed9, c)) for c in (0, 4, 10)}
    assert np.abs(wants[4] - wants[0]).mean() > 1 and np.abs(wants[4] - wants[10]).mean() > 1
    for crossover, want in wants.items():
        r = client.post("/v1/stylize", json={"image": base64.b64encode(face).decode(), "seed": 5, "mix_seed": 9,
                                             "crossover": crossover, "format": "json"})
        assert r.status_code == 200, r.text
        assert_same_image(decode(base64.b64decode(r.json()["image"])), want)
    assert_same_image(wants[10], expected(reference, face, seed5))  # all slots from the style
    # every kind of second style: a prompt, a registered style, a reference image (multipart)
    text_w = reference.style_from_text(TEXT)
    style_id = client.post("/v1/styles", json={"text": TEXT}).json()["style_id"]
    ref = png(random_image(7, 90))
    ref_w = reference.style_from_image(mio.pil_to_tensor(Image.open(io.BytesIO(ref)), 224)[None])
    for files, data, second in (({}, {"mix_text": TEXT}, text_w), ({}, {"mix_style_id": style_id}, text_w),
                                ({"mix_reference": ("r.png", ref)}, {}, ref_w)):
        r = client.post("/v1/stylize", files={"image": ("f.png", face), **files},
                        data={"seed": "5", "crossover": "6", **data})
        assert r.status_code == 200, r.text
        assert_same_image(decode(r.content), expected(reference, face, MMFS.mix(seed5, second, 6)))
    r = client.post("/v1/stylize", files={"image": ("f.png", face), "reference": ("r.png", ref)},
                    data={"mix_seed": "9", "crossover": "3"})
    assert_same_image(decode(r.content), expected(reference, face, MMFS.mix(ref_w, seed9, 3)))


def test_photo_align_and_paste_back(main_server, reference):
    """align: dlib finds the faces of a photo; against the faces module + the plain Stylizer here."""
    faces = pytest.importorskip("mmfs_fast.faces")
    skimage_data = pytest.importorskip("skimage.data")
    photo = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((200, 200), Image.LANCZOS))  # 40000 px
    found = faces.FaceDetector()(photo)
    assert len(found) == 1
    quads = [face.quad for face in found]
    with torch.no_grad():
        crops = reference.render(faces.align(photo, quads, SIZE), reference.style_from_seed(5), noise="zero")
    client = main_server.client(TOKEN)
    r = client.post("/v1/stylize", files={"image": ("p.png", png(Image.fromarray(photo)))},
                    data={"seed": "5", "align": "true"})
    assert r.status_code == 200 and r.headers["X-Faces"] == "1"
    assert_same_image(decode(r.content), np.asarray(mio.to_pil(crops[0]), dtype=np.int16))
    assert float(r.headers["Server-Timing"].removeprefix("render;dur=")) > 0
    r = client.post("/v1/stylize", json={"image": base64.b64encode(png(Image.fromarray(photo))).decode(),
                                         "seed": 5, "align": True, "paste_back": True})
    assert r.status_code == 200
    assert_same_image(decode(r.content), faces.paste_back(photo, crops, quads).astype(np.int16))

    no_face = {"image": ("f.png", png(random_image(0, 150)))}
    for data, status, words in (({"seed": "1", "align": "true"}, 422, "no face found"),
                                ({"seed": "1", "paste_back": "true"}, 422, "needs align"),
                                ({"seed": "1", "align": "maybe"}, 422, "align")):
        r = client.post("/v1/stylize", files={**no_face, **{name: (None, v) for name, v in data.items()}})
        assert r.status_code == status and words in r.json()["error"], r.text


def tiff() -> bytes:
    return png(random_image(3), "TIFF")


BAD_REQUESTS = [
    # (multipart files, form fields, or a JSON body; status; words of the message)
    ({"image": ("f.png", b"not an image")}, {"seed": "1"}, None, 415, "not an image"),
    ({"image": ("f.tif", tiff())}, {"seed": "1"}, None, 415, "supported format"),
    ({"image": ("f.png", png(random_image(0))[:200])}, {"seed": "1"}, None, 400, "truncated"),
    ({"image": ("f.png", b"")}, {"seed": "1"}, None, 400, "empty"),
    ({"image": ("f.png", png(Image.new("RGB", (300, 300))))}, {"seed": "1"}, None, 413, "exceeds"),
    ({}, {"seed": "1"}, None, 422, "image: required"),
    ({"image": ("f.png", png(random_image(0)))}, {}, None, 422, "exactly one style"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "text": "x"}, None, 422, "seed, text"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "-1"}, None, 422, "seed"),
    ({"image": ("f.png", png(random_image(0)))}, {"text": "   "}, None, 422, "empty"),
    ({"image": ("f.png", png(random_image(0)))}, {"style_id": "text-0"}, None, 404, "unknown style"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "colour": "red"}, None, 422, "colour"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "format": "gif"}, None, 422, "format"),
    ({"image": ("f.png", png(random_image(0))), "mask": ("m.png", b"")}, {"seed": "1"}, None, 422, "mask"),
    # style mixing: a second style needs a crossover, a crossover a second style
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_seed": "2"}, None, 422, "crossover: required"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "crossover": "3"}, None, 422, "second style"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_seed": "2", "crossover": "11"}, None, 422,
     "crossover"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_seed": "2", "crossover": "-1"}, None, 422,
     "crossover"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_seed": "2", "mix_text": "x", "crossover": "3"},
     None, 422, "at most one second style"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_style_id": "text-0", "crossover": "3"}, None,
     404, "unknown style"),
    ({"image": ("f.png", png(random_image(0)))}, {"seed": "1", "mix_text": " ", "crossover": "3"}, None, 422,
     "mix_text: must not be empty"),
    ({"image": ("f.png", png(random_image(0))), "mix_reference": ("r.png", b"nope")},
     {"seed": "1", "crossover": "3"}, None, 415, "mix_reference: not an image"),
    (None, None, {"image": "@@@", "seed": 1}, 400, "base64"),
    (None, None, {"image": base64.b64encode(png(random_image(0))).decode(), "seed": 1, "path": "/etc/passwd"},
     422, "path"),
    (None, None, [1, 2], 422, "object"),
]


@pytest.mark.parametrize("files,data,body,status,words", BAD_REQUESTS)
def test_bad_requests_get_clear_4xx(main_server, files, data, body, status, words):
    client = main_server.client(TOKEN)
    if body is not None:
        r = client.post("/v1/stylize", json=body)
    else:
        r = client.post("/v1/stylize", files={**files, **{name: (None, v) for name, v in data.items()}})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_refusals_are_answered_before_the_body_is_sent(main_server):
    """auth and the declared size are decided on the headers: the client has sent no byte of
    its body when the answer comes, and with Expect: 100-continue it is never asked for it."""
    port = main_server.port
    post = "POST /v1/stylize HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
    status, headers, body = raw_request(port, post + "Content-Length: 200000\n")  # no token
    assert status == 401 and headers["www-authenticate"] == "Bearer" and b"token" in body
    status, headers, body = raw_request(port, post + "Content-Length: 200000\nExpect: 100-continue\n"
                                        "Authorization: Bearer wrong\n")
    assert status == 401  # the final answer first: no "100 Continue" interim response was sent
    status, _, body = raw_request(port, post + f"Content-Length: {10 ** 9}\nAuthorization: Bearer {TOKEN}\n")
    assert status == 413 and b"limit" in body


def test_bad_bodies(main_server):
    client = main_server.client(TOKEN)
    r = client.post("/v1/stylize", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    deep = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b', "seed": 1}'  # 200 KB, below the size limit
    r = client.post("/v1/stylize", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "100001 levels deep" in r.json()["error"], r.text
    r = client.post("/v1/styles", content=b'{"text": ' + b'{"a": ' * 30_000 + b"1" + b"}" * 30_001,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "levels deep" in r.json()["error"]
    # brackets inside strings are text, not nesting: a valid body with them is served
    r = client.post("/v1/styles", json={"text": "[[[[[[[[[[[[ {{{{{{{{{{ \\\" [[[[["})
    assert r.status_code == 201
    r = client.post("/v1/stylize", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    big = os.urandom(300_000)  # above --max-upload-mb 0.25
    r = client.post("/v1/stylize", files={"image": ("f.png", big)}, data={"seed": "1"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds on the bytes received
        for _ in range(10):
            yield big[:40_000]
    r = client.post("/v1/stylize", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/styles", json={"text": ""})
    assert r.status_code == 422 and "empty" in r.json()["error"]
    r = client.post("/v1/styles", json={"text": "a", "reference": base64.b64encode(b"x").decode()})
    assert r.status_code == 422 and "exactly one" in r.json()["error"]
    # the server still serves after all of that
    assert client.post("/v1/stylize", files={"image": ("f.png", png(random_image(0)))},
                       data={"seed": "2"}).status_code == 200


def test_64_concurrent_mixed_styles(main_server, reference):
    client = main_server.client(TOKEN)
    style_id = client.post("/v1/styles", json={"text": TEXT}).json()["style_id"]
    ref = png(random_image(9, 90))
    faces = [png(random_image(10 + i)) for i in range(4)]
    styles = [({"seed": str(s)}, {}, reference.style_from_seed(s)) for s in (0, 1, 2)]
    styles += [({"style_id": style_id}, {}, reference.style_from_text(TEXT)),
               ({"text": "pencil sketch"}, {}, reference.style_from_text("pencil sketch")),
               ({}, {"reference": ("r.png", ref)},
                reference.style_from_image(mio.pil_to_tensor(Image.open(io.BytesIO(ref)), 224)[None]))]
    want = {(f, s): expected(reference, faces[f], styles[s][2]) for f in range(4) for s in range(len(styles))}
    # the styles really differ, so a mix-up could not pass as a rounding difference
    assert min(np.abs(want[0, a] - want[0, b]).mean() for a in range(6) for b in range(a)) > 3
    jobs = [(i % 4, (i // 4) % len(styles)) for i in range(64)]

    async def run_all():
        async with httpx.AsyncClient(base_url=main_server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as aclient:
            return await asyncio.gather(*(aclient.post(
                "/v1/stylize", files={"image": ("f.png", faces[f]), **styles[s][1]}, data=styles[s][0])
                for f, s in jobs))

    responses = asyncio.run(run_all())
    for (f, s), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert_same_image(decode(r.content), want[f, s])
    batches = [line for line in client.get("/metrics").text.splitlines()
               if line.startswith("mmfs_fast_batch_size_count")]
    assert batches  # micro-batches ran and were counted


# -- limits: queue, timeout, shutdown (auth off / from the environment) -----------------------

def in_flight(client) -> int:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith("mmfs_fast_requests_in_flight"))
    return int(line.split()[1])


def test_queue_full_503_and_graceful_shutdown(ckpt, reference):
    # each micro-batch waits 3 s for company: requests stay queued long enough to observe
    server = Server(ckpt, "--no-warmup", "--max-queue", "3", "--max-wait-ms", "3000")
    try:
        client = server.client()  # no auth configured: no token needed
        face = png(random_image(20))
        results = [None] * 3

        def send(i):
            results[i] = client.post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": str(i)})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while in_flight(client) < 3:
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.05)
        r = client.post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "0"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]
        # decided before the body: the answer comes while the client has sent only its headers
        status, headers, body = raw_request(server.port, "POST /v1/stylize HTTP/1.1\nHost: x\nContent-Type: "
                                            "multipart/form-data; boundary=b\nContent-Length: 100000\n")
        assert status == 503 and headers["retry-after"] == "1" and b"busy" in body
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for i, r in enumerate(results):
            assert r.status_code == 200, r.text
            assert_same_image(decode(r.content), expected(reference, face, reference.style_from_seed(i)))
        # uvicorn re-raises the signal once it has shut down cleanly
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.stop()


def test_timeout_504_with_env_token(ckpt):
    server = Server(ckpt, "--no-warmup", "--request-timeout", "0.5", "--max-wait-ms", "5000",
                    env={"MMFS_FAST_API_TOKEN": TOKEN})
    try:
        face = png(random_image(21))
        r = server.client().post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "1"})
        assert r.status_code == 401
        r = server.client(TOKEN).post("/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "1"})
        assert r.status_code == 504 and "within 0.5 s" in r.json()["error"]
    finally:
        server.stop()


class InProcessServer:
    """uvicorn serving ``app`` in a thread of this process (so a test can watch the engine)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "in-process server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def test_a_timed_out_request_is_never_computed(ckpt):
    """504: the faces of the request that the engine has not taken yet are cancelled; the
    engine's stylize calls are counted here, in the same process."""
    engine = load_engine(ckpt, device="cpu", cuda_graphs=False, max_wait_ms=3000)  # 3 s for company
    stylized = []
    stylize = engine.stylize

    def counting_stylize(faces, *args, **kwargs):
        stylized.append(faces.shape[0])
        return stylize(faces, *args, **kwargs)

    engine.stylize = counting_stylize
    app = create_app(lambda: engine, ServeSettings(request_timeout=0.5, warmup=False))
    with InProcessServer(app) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        r = client.post("/v1/stylize", files={"image": ("f.png", png(random_image(22)))}, data={"seed": "1"})
        assert r.status_code == 504
        # a face sent to the engine directly joins the same micro-batch and waits for its run
        alone = engine.submit(mio.pil_to_tensor(random_image(23), SIZE), 2).result(60)
        assert alone.shape == (3, SIZE, SIZE)
        assert stylized == [1]  # the timed-out face was not computed
        text = client.get("/metrics").text
        assert 'mmfs_fast_faces_total{outcome="cancelled"} 1' in text and 'outcome="rendered"' not in text
        assert "mmfs_fast_requests_in_flight 0" in text
        r = client.post("/v1/stylize", files={"image": ("f.png", png(random_image(22)))}, data={"seed": "1"})
        assert r.status_code == 504  # still serving: the 3 s batching window outlasts every request


SLOW_HEAD = "POST /v1/stylize HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"


def trickle(sock, data: bytes, every: float = 0.25) -> tuple[int, dict, bytes]:
    """Send ``data`` a byte every ``every`` s until the server answers; its answer."""
    for i in range(len(data)):
        sock.sendall(data[i:i + 1])
        if select.select([sock], [], [], every)[0]:
            return read_response(sock)
    raise AssertionError("the server let the whole trickle through")


def test_slow_and_vanishing_clients(ckpt):
    """1 byte every 0.25 s: cut off after the header or body timeout with 408 and the
    connection closed; a client that disconnects mid-upload is one info line and a counter."""
    server = Server(ckpt, "--no-warmup", "--header-timeout", "1", "--body-timeout", "1", "--log-level", "info")
    try:
        padding = "X-Padding: " + "p" * 200 + "\r\n"  # 50 s at this pace
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            status, _, body = trickle(sock, (SLOW_HEAD.replace("\n", "\r\n") + padding).encode())
            assert status == 408 and b"headers were not received within 1 s" in body
            assert closed_by_peer(sock)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((SLOW_HEAD + "Content-Length: 400\n\n").replace("\n", "\r\n").encode())
            status, headers, body = trickle(sock, b"--b\r\n" + b"x" * 394)
            assert status == 408 and b"body was not received within 1 s" in body
            assert headers["connection"] == "close"
            assert closed_by_peer(sock)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((SLOW_HEAD + "Content-Length: 5000\n\n").replace("\n", "\r\n").encode()
                         + b'--b\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n\r\n'
                         + png(random_image(24))[:100])
        client = server.client()
        deadline = time.monotonic() + 30
        while 'mmfs_fast_client_aborts_total{reason="disconnect"} 1' not in (text := client.get("/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        for reason in ("body_timeout", "header_timeout"):
            assert f'mmfs_fast_client_aborts_total{{reason="{reason}"}} 1' in text
        assert "mmfs_fast_requests_in_flight 0" in text
        # a well-behaved client is still served
        r = client.post("/v1/stylize", files={"image": ("f.png", png(random_image(24)))}, data={"seed": "1"})
        assert r.status_code == 200
    finally:
        server.stop()
    log = server.proc.stdout.read()
    assert log.count("disconnected before sending its whole body") == 1, log
    assert "Traceback" not in log and "unhandled" not in log, log


def test_ray_serve_deployment(ckpt, reference):
    pytest.importorskip("ray.serve")
    from ray import serve

    from mmfs_fast.serve.ray import build_app

    app = build_app(str(ckpt), num_gpus=0, autoscaling_config={"max_replicas": 1}, clip=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        face = png(random_image(0))
        r = httpx.post(f"{url}/v1/stylize", files={"image": ("f.png", face)}, data={"seed": "1"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert_same_image(decode(r.content), expected(reference, face, reference.style_from_seed(1)))
    finally:
        serve.shutdown()
