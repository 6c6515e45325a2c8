"""Backend choice for the custom ops: ``ref`` (plain PyTorch), ``cuda`` (the
ahead-of-time built extension ``mmfs_fast._C``) and ``triton`` (kernels/).

Each op module keeps a dict ``impl name -> function``; the public op calls
:func:`resolve` to turn ``impl="auto"|"ref"|"cuda"|"triton"`` into one of them.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Collection

import torch

IMPLS = ("ref", "cuda", "triton")
# "auto" order for CUDA tensors, fastest first: measured (bench/results/), not assumed.
FASTEST_FIRST = ("cuda", "triton", "ref")
# modulated_conv2d: cuDNN's grouped convolution (ref) measured fastest (bench/results/); the cuda op
# (one shared-weight cuDNN convolution between our scale kernels) moves up once measured as an op.
FASTEST_FIRST_PER_OP = {"modulated_conv2d": ("ref", "cuda")}
# what the kernels are built for; float64 (gradient checks) goes to ref under "auto"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_HOW_TO_GET = {
    "cuda": (
        "the CUDA extension mmfs_fast._C is not built; reinstall on a machine with nvcc and a "
        "CUDA build of torch: CUDA_HOME=/usr/local/cuda pip install --no-build-isolation ."
    ),
    "triton": (
        "Triton is not installed (pip install triton), or the tensor is on the CPU and "
        "TRITON_INTERPRET=1 is not set"
    ),
}


def _load_cuda_extension():
    if importlib.util.find_spec("mmfs_fast._C") is None:
        return None
    try:
        from mmfs_fast import _C
    except ImportError as e:  # built, but against another torch or CUDA: say so instead of hiding it
        warnings.warn(f"mmfs_fast: the CUDA extension is installed but does not load ({e}); the cuda backend "
                      "is off. Rebuild it against this torch: pip install --no-build-isolation .", RuntimeWarning)
        return None
    return _C


# Settled once at import: the checks below then read constants, which torch.compile
# (fullgraph=True) traces through without a graph break. Finding triton's spec does
# not import it (slow); kernels/ import it on first use.
_CUDA_EXTENSION = _load_cuda_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def cuda_extension():
    """The compiled extension module (importing it registers torch.ops.mmfs_fast.*), or None
    when it was not built."""
    return _CUDA_EXTENSION


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def installed(impl: str) -> bool:
    """Whether the machinery behind ``impl`` is present (built extension, triton package)."""
    return {"ref": True, "cuda": _CUDA_EXTENSION is not None, "triton": _TRITON_INSTALLED}[impl]


def can_run(impl: str, x: torch.Tensor) -> bool:
    if not installed(impl):
        return False
    if impl == "cuda":
        return x.is_cuda
    if impl == "triton":
        return x.is_cuda or triton_interpreting()
    return True


def fastest_first(op: str) -> tuple[str, ...]:
    return FASTEST_FIRST_PER_OP.get(op, FASTEST_FIRST)


def available(op: str, implemented: Collection[str], x: torch.Tensor) -> list[str]:
    """The implemented impls that can run ``op`` on ``x``, fastest first."""
    return [impl for impl in fastest_first(op) if impl in implemented and can_run(impl, x)]


@functools.cache
def _warn_slow_fallback(op: str) -> None:
    warnings.warn(
        f"mmfs_fast: {op} on a CUDA tensor falls back to the slow pure-PyTorch 'ref' path: "
        f"{_HOW_TO_GET['cuda']}; or pip install triton", RuntimeWarning, stacklevel=4)


def resolve(op: str, impl: str, implemented: Collection[str], x: torch.Tensor) -> str:
    """The impl that runs ``op`` on ``x``.

    ``auto`` takes the fastest one available for CUDA tensors of a kernel dtype
    (warning once per op when that is a fallback to ``ref``) and ``ref`` otherwise. An explicit impl that
    cannot run raises, naming how to get it.
    """
    if impl == "auto":
        if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
            return "ref"
        best = available(op, implemented, x)[0]
        if best == "ref" and fastest_first(op)[0] != "ref":
            _warn_slow_fallback(op)
        return best
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto' or one of {IMPLS}; got {impl!r}")
    if impl not in implemented:
        raise RuntimeError(f"mmfs_fast: {op} has no {impl!r} implementation in this version")
    if not can_run(impl, x):
        where = "CUDA" if x.is_cuda else "CPU"
        raise RuntimeError(f"mmfs_fast: impl={impl!r} cannot run {op} on a {where} tensor: {_HOW_TO_GET[impl]}")
    return impl
