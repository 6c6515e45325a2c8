"""Backend choice for the custom ops: ``ref`` (plain PyTorch), ``cuda`` (the
ahead-of-time built extension ``mmfs_fast._C``) and ``triton`` (kernels/).

Each op module keeps a dict ``impl name -> function``; the public op calls
:func:`resolve` to turn ``impl="auto"|"ref"|"cuda"|"triton"`` into one of them.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Collection

import torch

from mmfs_fast.ops._torch_target import TORCH_TARGET

IMPLS = ("ref", "cuda", "triton")
# "auto" order for CUDA tensors, fastest first: measured, not assumed. bench/test_bench_ops.py
# writes it on a GPU; bench/cost_model.py reads the same file.
WINNERS_FILE = Path(__file__).with_name("winners.json")
_WINNERS = json.loads(WINNERS_FILE.read_text())
FASTEST_FIRST = tuple(_WINNERS["default"])
FASTEST_FIRST_PER_OP = {op: tuple(entry["order"]) for op, entry in _WINNERS["ops"].items()}
# the two exact forms of each convolution with a choice, the training one first: a decoder
# upsampling convolution (transposed conv + blur, or the blur folded into four phase
# convolutions), an encoder downsampling one (blur + strided conv, or the blur folded into one
# larger strided kernel) and the encoder's first one on the RGB face (the convolution and a bias
# + activation pass, or the stem_conv op's one pass); winners.json holds the default order and
# per-shape "I×O@H" winners
CONV_FORMS = {"upsample": ("transposed", "polyphase"), "downsample": ("blurred", "folded"),
              "stem": ("separate", "fused")}
UPSAMPLE_FORMS, DOWNSAMPLE_FORMS, STEM_FORMS = CONV_FORMS["upsample"], CONV_FORMS["downsample"], CONV_FORMS["stem"]
_CONV_FORM_WINNERS = {kind: _WINNERS[kind] for kind in CONV_FORMS}
# what the kernels are built for; float64 (gradient checks) goes to ref under "auto"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NOT_BUILT = ("mmfs_fast._C is not built (at install time torch was a CPU-only build or nvcc was not found; "
              "pip install -v . prints which): install on a machine with nvcc and a CUDA build of torch, "
              "CUDA_HOME=/usr/local/cuda pip install .")


def _release(version: str) -> tuple[int, ...]:
    """(2, 11) from '2.11.0+cu130'."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _why_it_does_not_load(error: ImportError) -> str:
    """One line for the usual reasons a built extension fails to load, instead of the loader's."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    rebuild = "rebuild it against this torch: pip install --no-build-isolation ."
    missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", message)
    if missing:
        return (f"it needs {missing.group(1)}, which torch {torch.__version__} (CUDA {torch.version.cuda}) does "
                f"not provide: it was built for another CUDA version; {rebuild}")
    undefined = re.search(r"undefined symbol: (\S+)", message)
    if undefined:
        return (f"torch {torch.__version__} lacks {undefined.group(1)}, which the extension calls (it was built "
                f"against a newer stable ABI than this torch has); {rebuild}")
    return f"{message}; {rebuild}"


def _load_cuda_extension():
    """(the module, None), or (None, why the cuda backend is off, in one line)."""
    spec = importlib.util.find_spec("mmfs_fast._C")
    if spec is None:
        return None, _NOT_BUILT
    target = ".".join(map(str, TORCH_TARGET))
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build, and the extension's kernels need a CUDA build"
    elif _release(torch.__version__) < TORCH_TARGET:
        why = (f"torch {torch.__version__} is older than {target}, the oldest release whose stable ABI the "
               f"extension uses: pip install 'torch>={target}'")
    else:
        try:
            import mmfs_fast._C as extension  # the compiled submodule, named whole
        except ImportError as e:  # built for another CUDA or a newer torch: say so instead of the loader's words
            why = _why_it_does_not_load(e)
        else:
            return extension, None
    # lineno 0: the warning names the library and shows no source line, so it stays one line
    warnings.warn_explicit(f"mmfs_fast: the CUDA extension is installed but off: {why}. The triton and ref "
                           "backends remain.", RuntimeWarning, filename=spec.origin, lineno=0)
    return None, f"the CUDA extension is installed but off: {why}"


# Settled once at import: the checks below then read constants, which torch.compile
# (fullgraph=True) traces through without a graph break. Finding triton's spec does
# not import it (slow); kernels/ import it on first use.
_CUDA_EXTENSION, _CUDA_EXTENSION_OFF = _load_cuda_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def cuda_extension():
    """The compiled extension module (importing it registers torch.ops.mmfs_fast.*), or None
    when it was not built or does not load here."""
    return _CUDA_EXTENSION


def cuda_extension_off() -> str | None:
    """Why the cuda backend is off, in one line; None when the extension loaded."""
    return _CUDA_EXTENSION_OFF


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


def why_not(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on tensors of ``device`` here, in one line naming the actual
    cause (no GPU, not built, not installed); None when it can."""
    device = torch.device(device)
    if impl == "ref":
        return None
    on_cpu = device.type != "cuda"
    no_gpu = "there is no CUDA GPU on this machine" if not torch.cuda.is_available() else None
    if impl == "cuda":
        if not installed("cuda"):
            return _CUDA_EXTENSION_OFF
        if on_cpu:
            return (f"{no_gpu}: the cuda backend runs on GPUs only" if no_gpu else
                    "the tensors are on the CPU: the cuda backend runs CUDA tensors only (use a CUDA device)")
        return None
    if impl == "triton":
        if not installed("triton"):
            return "Triton is not installed: pip install triton"
        if on_cpu and not triton_interpreting():
            return (f"Triton is installed, but {no_gpu or 'the tensors are on the CPU'}: its kernels run on GPUs "
                    "(or on the CPU in the slow interpreter, TRITON_INTERPRET=1)")
        return None
    raise ValueError(f"impl must be 'auto' or one of {IMPLS}; got {impl!r}")


def fastest_first(op: str) -> tuple[str, ...]:
    return FASTEST_FIRST_PER_OP.get(op, FASTEST_FIRST)


def shape_key(in_ch: int, out_ch: int, size: int) -> str:
    """winners.json's key of a resampling convolution: channels in × out @ input height."""
    return f"{in_ch}x{out_ch}@{size}"


def conv_form(kind: str, in_ch: int, out_ch: int, size: int) -> str:
    """The faster form of the ``kind`` ("upsample" or "downsample") convolution at this shape
    (see CONV_FORMS): the shape's winner, else the default order's first."""
    entry = _CONV_FORM_WINNERS[kind]
    return entry["shapes"].get(shape_key(in_ch, out_ch, size), entry["order"])[0]


def form_wins_somewhere(kind: str, form: str, in_ch: int, out_ch: int) -> bool:
    """Whether any resolution of an in_ch → out_ch ``kind`` convolution takes ``form``."""
    entry = _CONV_FORM_WINNERS[kind]
    if entry["order"][0] == form:
        return True
    prefix = shape_key(in_ch, out_ch, 0)[:-1]
    return any(key.startswith(prefix) and forms[0] == form for key, forms in entry["shapes"].items())


def available(op: str, implemented: Collection[str], x: torch.Tensor) -> list[str]:
    """The implemented impls that can run ``op`` on ``x``, fastest first."""
    return [impl for impl in fastest_first(op) if impl in implemented and can_run(impl, x)]


@functools.cache
def _warn_slow_fallback(op: str) -> None:
    warnings.warn(
        f"mmfs_fast: {op} on a CUDA tensor falls back to the slow pure-PyTorch 'ref' path: "
        f"{why_not('cuda', torch.device('cuda')) or 'cuda has no kernel for it'}; "
        f"{why_not('triton', torch.device('cuda')) or 'triton has no kernel for it'}", RuntimeWarning, stacklevel=4)


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
        raise RuntimeError(f"mmfs_fast: impl={impl!r} cannot run {op}: {why_not(impl, x.device)}")
    return impl
