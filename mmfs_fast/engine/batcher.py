"""Micro-batching: single requests from many threads gathered into one Engine run.

A worker thread takes the queued requests once ``max_batch`` of them wait or ``max_wait_ms``
after the first arrived, resolves their styles in one batch per kind and stylizes them in
one batch per noise mode. A bad request fails only its own Future.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from mmfs_fast.models.noise import NOISE_MODES
from mmfs_fast.validation import check_tensor


@dataclass
class Request:
    face: torch.Tensor
    style: object
    noise: str
    style_key: Hashable | None
    future: Future


class Batcher:
    """Runs the requests of :meth:`submit` through ``engine`` in micro-batches."""

    def __init__(self, engine, max_batch: int, max_wait_ms: float):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.engine, self.max_batch, self.max_wait_ms = engine, max_batch, max_wait_ms
        self._queue: list[Request] = []
        self._batch_sizes: Counter = Counter()  # micro-batches run, by size
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    def submit(self, face: torch.Tensor, style, noise: str = "zero", style_key: Hashable | None = None) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(Request(face, style, noise, style_key, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="mmfs-engine", daemon=True)
                self._worker.start()
            self._cond.notify()
        return future

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "batch_sizes": dict(self._batch_sizes)}

    def close(self) -> None:
        """Finish every submitted request, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while len(self._queue) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._batch_sizes[len(batch)] += 1
            self._process([r for r in batch if r.future.set_running_or_notify_cancel()])

    def _process(self, requests: list[Request]) -> None:
        """Run one batch of requests; each error goes to its own request's Future."""
        engine = self.engine
        pending = []
        for request in requests:
            try:
                check_tensor("face", request.face, (3, engine.config.size, engine.config.size))
                if request.noise not in NOISE_MODES:
                    raise ValueError(f"noise must be one of {NOISE_MODES}, got {request.noise!r}")
                pending.append((request, _style_kind(request.style)))
            except Exception as e:
                request.future.set_exception(e)
        resolvers = {"seed": lambda rs: engine.style_from_seed([r.style for r in rs]),
                     "text": lambda rs: engine.style_from_text([r.style for r in rs]),
                     "image": lambda rs: engine.style_from_image(
                         torch.stack([r.style for r in rs]),
                         keys=[r.style_key for r in rs] if all(r.style_key is not None for r in rs) else None),
                     "w+": lambda rs: engine.check_w_plus(torch.stack([r.style for r in rs]), len(rs))}
        styled = []
        for kind, resolve in resolvers.items():
            group = [request for request, k in pending if k == kind]
            for request, w_plus in zip(group, _batched(resolve, group)):
                if isinstance(w_plus, Exception):
                    request.future.set_exception(w_plus)
                else:
                    styled.append((request, w_plus))
        for noise in NOISE_MODES:
            group = [(r, w) for r, w in styled if r.noise == noise]
            results = _batched(lambda items: engine.stylize(torch.stack([r.face for r, _ in items]),
                                                            torch.stack([w for _, w in items]), noise), group)
            for (request, _), image in zip(group, results):
                if isinstance(image, Exception):
                    request.future.set_exception(image)
                else:
                    request.future.set_result(image)


def _style_kind(style) -> str:
    if isinstance(style, int) and not isinstance(style, bool):
        return "seed"
    if isinstance(style, str):
        return "text"
    if isinstance(style, torch.Tensor) and style.ndim in (2, 3):
        return "w+" if style.ndim == 2 else "image"
    shape = f" of shape {tuple(style.shape)}" if isinstance(style, torch.Tensor) else ""
    raise TypeError(f"style must be a seed (int), a text prompt (str), a reference image (3, H, W) tensor or a "
                    f"w+ (10, D) tensor; got {type(style).__name__}{shape}")


def _batched(fn: Callable, items: list) -> list:
    """fn(items), one result per item, computed as one batch; if the batch fails, item by
    item, so that an error (as the item's result) stays with the item that caused it."""
    if not items:
        return []
    try:
        return list(fn(items))
    except Exception:
        results = []
        for item in items:
            try:
                results.append(fn([item])[0])
            except Exception as e:
                results.append(e)
        return results
