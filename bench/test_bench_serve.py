"""The HTTP service (issue 11): requests/s and p50/p99 latency at fixed concurrency.

A real server process (``python -m mmfs_fast.serve``) on a free localhost port: the full
512² model on a GPU (fp16 Engine, CUDA graphs), the reduced profile's Stylizer on the CPU;
random weights, seed styles, no CLIP. httpx clients send ``REQUESTS`` POST /v1/stylize
(a PNG face upload + a seed) per round, ``concurrency`` at a time; one timed round is all
of them. Percentiles come from every request's own latency over all rounds.
"""
from __future__ import annotations

import asyncio
import io
import signal
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from harness import ON_GPU, PROFILE
from mmfs_fast import benchmark as mb
from mmfs_fast.models import Stylizer

httpx = pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")
pytest.importorskip("multipart", reason="needs the 'serve' extra")

from PIL import Image  # noqa: E402

CONCURRENCY = (1, 8, 32)
REQUESTS = 64 if ON_GPU else 32  # per round
ROUNDS = 3 if ON_GPU else 2
SEEDS = 4  # styles cycled through, so micro-batches mix styles
READY_TIMEOUT_S = 180  # a GPU server captures its CUDA graphs before /readyz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A started server's base URL; stopped (SIGTERM, graceful) after the module."""
    if ON_GPU:
        model = ["--random-init", "--no-clip"]  # the default config: the 512² Stylizer
    else:
        ckpt = tmp_path_factory.mktemp("serve") / "reduced.safetensors"
        Stylizer(PROFILE.stylizer).save(ckpt)
        model = ["--ckpt", str(ckpt)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("serve-log") / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "mmfs_fast.serve", *model, "--port", str(port),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not become ready:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def face_png(size: int) -> bytes:
    """A smooth random picture (PNG compresses it like a photo, unlike noise)."""
    small = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_serve(concurrency: int, server_url: str, benchmark):
    face = face_png(PROFILE.stylizer.size)
    latencies: list[float] = []  # of every timed request
    round_seconds: list[float] = []
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(base_url=server_url, timeout=120,
                               limits=httpx.Limits(max_connections=concurrency))

    async def request(i: int) -> None:
        start = time.perf_counter()
        r = await client.post("/v1/stylize", files={"image": ("face.png", face)}, data={"seed": str(i % SEEDS)})
        latencies.append(time.perf_counter() - start)
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:300]}")

    async def worker(next_index) -> None:
        for i in next_index:
            await request(i)

    async def one_round() -> None:
        start = time.perf_counter()
        indices = iter(range(REQUESTS))  # shared: each worker takes the next request when it is free
        await asyncio.gather(*(worker(indices) for _ in range(concurrency)))
        round_seconds.append(time.perf_counter() - start)

    try:
        loop.run_until_complete(one_round())  # warm-up: connections, first batches of each size
        latencies.clear()
        round_seconds.clear()
        benchmark.group = f"serve c{concurrency}"
        benchmark.pedantic(lambda: loop.run_until_complete(one_round()), rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    # timed here too: --benchmark-disable (xdist) keeps no stats
    round_s = statistics.median(round_seconds)
    benchmark.extra_info.update(mb.environment())
    benchmark.extra_info.update(
        profile=PROFILE.name, task="serve", endpoint="/v1/stylize", concurrency=concurrency, requests=REQUESTS,
        size=PROFILE.stylizer.size, requests_per_s=REQUESTS / round_s, p50_ms=1e3 * np.percentile(latencies, 50),
        p99_ms=1e3 * np.percentile(latencies, 99), mean_ms=1e3 * statistics.fmean(latencies))
