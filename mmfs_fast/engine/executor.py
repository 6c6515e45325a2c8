"""Static-shape execution: batches padded to bucket sizes, run eagerly, through
torch.compile, or as CUDA graphs captured once per (function, bucket) and replayed."""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


def parse_buckets(buckets: Sequence[int] | str | None, mode: str) -> tuple[int, ...] | None:
    """"auto": DEFAULT_BUCKETS where static shapes pay (graphs, compile), else no padding."""
    if buckets == "auto":
        return DEFAULT_BUCKETS if mode != "eager" else None
    if buckets is None:
        return None
    buckets = tuple(sorted(set(buckets)))
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"buckets must be positive ints, got {buckets}")
    return buckets


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]
    output: torch.Tensor


class Executor:
    """Runs batch functions at bucketed batch sizes: eagerly, compiled, or as CUDA graphs
    captured per (function, bucket, input shapes) and replayed.

    Every row of every function is independent of the others, so padding rows (zeros, or
    whatever an earlier replay left in a static buffer) never change the real rows. All graphs share one memory pool, so the
    workspace is that of the largest capture: a graph's static output may sit in memory
    another graph's replay writes to, which is harmless because replays are serialised by
    ``lock`` and each output is copied out right after its replay.
    """

    def __init__(self, device: torch.device, buckets: tuple[int, ...] | None, mode: str,
                 graph_memory_limit: int | None):
        self.device, self.buckets, self.mode = device, buckets, mode
        self.graph_memory_limit = graph_memory_limit
        self.lock = threading.RLock()
        self.pool = torch.cuda.graph_pool_handle() if mode == "graph" else None
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: set[str] = set()
        self._branch_stream: torch.cuda.Stream | None = None

    def run(self, name: str, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) for inputs sharing batch size B, in chunks of at most the largest bucket."""
        batch = inputs[0].shape[0]
        if self.buckets is None:
            return self._call(fn, inputs)
        step = self.buckets[-1]
        chunks = [self._run_bucket(name, fn, [x[i:i + step] for x in inputs]) for i in range(0, batch, step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run_bucket(self, name: str, fn: Callable, inputs: list[torch.Tensor]) -> torch.Tensor:
        n = inputs[0].shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        if self.mode == "graph" and name not in self.failed:
            graph = self._graph(name, fn, bucket, inputs)
            if graph is not None:
                for static, x in zip(graph.inputs, inputs):
                    static[:n].copy_(x)
                graph.graph.replay()
                return graph.output[:n].clone()
        padded = [torch.cat([x, x.new_zeros((bucket - n, *x.shape[1:]))]) if bucket > n else x for x in inputs]
        return self._call(fn, padded)[:n]

    def side_by_side(self, branch: Callable[[], A], main: Callable[[], B]) -> tuple[A, B]:
        """(branch(), main()), branch's kernels on a second CUDA stream so that they run while
        main's do: captured, the two are parallel branches of the graph, and the GPU's per-kernel
        gaps of a chain of small kernels (a style) pass while a chain of big ones (the encoder)
        runs. In order on the CPU and under torch.compile (which schedules its own graph).

        Memory: branch's outputs are allocated on its stream and read on the current one after the
        join; once freed, only branch-stream work queued after a later fork can reuse them, and a
        fork waits for everything queued before it. branch may read only tensors that outlive the
        join (the function's inputs, its own results)."""
        if self.device.type != "cuda" or self.mode == "compile":
            return branch(), main()
        if self._branch_stream is None:
            self._branch_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._branch_stream.wait_stream(current)
        with torch.cuda.stream(self._branch_stream):
            first = branch()
        second = main()
        current.wait_stream(self._branch_stream)
        return first, second

    def _call(self, fn: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = fn(*inputs)
        # torch.compile's own CUDA graphs (cudagraph trees) overwrite their outputs on the next call
        return out.clone() if self.mode == "compile" else out

    def _graph(self, name: str, fn: Callable, bucket: int, inputs: list[torch.Tensor]) -> _Graph | None:
        key = (name, bucket, *((tuple(x.shape[1:]), x.dtype) for x in inputs))
        if key in self.graphs:
            return self.graphs[key]
        if self.graph_memory_limit is not None and torch.cuda.memory_reserved(self.device) > self.graph_memory_limit:
            warnings.warn(f"mmfs_fast.Engine: graph_memory_limit reached; {name} at batch {bucket} runs eagerly",
                          RuntimeWarning, stacklevel=4)
            return None
        static = [x.new_zeros((bucket, *x.shape[1:])) for x in inputs]
        try:
            # warm-up runs on a side stream (cuDNN autotuning, Triton JIT) before the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (callers' own models) may go on during the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = fn(*static)
        except RuntimeError as e:
            warnings.warn(f"mmfs_fast.Engine: cannot capture {name} as a CUDA graph, it runs eagerly: {e}",
                          RuntimeWarning, stacklevel=4)
            self.failed.add(name)
            return None
        self.graphs[key] = _Graph(graph, static, output)
        return self.graphs[key]

    def static_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.graphs.values() for t in (*g.inputs, g.output))

    def release(self) -> None:
        with self.lock:
            self.graphs.clear()
            self.failed.clear()
            self.pool = torch.cuda.graph_pool_handle() if self.mode == "graph" else None


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN times its algorithms for each new shape while inside (if ``enabled``)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
