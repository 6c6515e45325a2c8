"""Constants and helpers the benchmark modules share (a module, not conftest, so that
test files can import it)."""
from __future__ import annotations

import torch
import torch._dynamo

import peaks
from mmfs_fast import benchmark as mb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROFILE = mb.default_profile(DEVICE)
ON_GPU = DEVICE.type == "cuda"
DTYPE_NAMES = tuple(mb.DTYPES) if ON_GPU else ("fp32",)
# Timed rounds per case; each round repeats the call until it lasts about ROUND_SECONDS,
# so that launch overhead and timer resolution do not dominate microsecond kernels.
ROUNDS = 10 if ON_GPU else 3
OP_ROUNDS = 5 if ON_GPU else 3  # ~1800 op cases on a GPU: fewer rounds keep them within a GPU window
ROUND_SECONDS = 2e-3
MAX_ITERATIONS = 100
if not ON_GPU:
    # The CPU run only keeps the suite alive; one thread keeps it quick on a loaded CI
    # machine, where oversubscribed OpenMP threads make tiny ops 100x slower.
    torch.set_num_threads(1)

# Each shape, dtype and batch size is its own graph; stop dynamo from giving up
# (and silently running eagerly) after its default 8 recompilations.
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 100_000


def record_rate(benchmark, seconds: float, dtype: str, *, flops: float | None = None,
                bytes_moved: float | None = None) -> None:
    """Achieved TFLOP/s or GB/s and the fraction of this GPU's peak, into extra_info."""
    device = mb.environment()["device"]
    if flops is not None:
        tflops = flops / seconds / 1e12
        benchmark.extra_info.update(tflops=tflops, fraction_of_peak=peaks.fraction_of_peak(device, dtype, tflops=tflops))
    else:
        gbps = bytes_moved / seconds / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_peak=peaks.fraction_of_peak(device, dtype, gbps=gbps))
