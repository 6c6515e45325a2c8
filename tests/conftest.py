import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def _import_triton_for_the_interpreter() -> bool:
    """Without a GPU the triton tests run through the Triton interpreter, which must be
    on when triton and the kernel modules are first imported (triton.jit and the
    autotune config lists read it then, and triton.language decorates its own helpers).
    Import them here, before any test module can (test_architecture imports every
    module), with TRITON_INTERPRET=1 set for the import only: test_triton_ops.py sets it
    again while its own tests run. Returns whether triton is ready for the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if torch.cuda.is_available() or "triton" in sys.modules:
        return False
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        try:
            import triton  # noqa: F401

            import mmfs_fast.kernels
        except ImportError:
            return False
        for module in pkgutil.iter_modules(mmfs_fast.kernels.__path__, "mmfs_fast.kernels."):
            importlib.import_module(module.name)
    return True


TRITON_INTERPRETABLE = _import_triton_for_the_interpreter()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second intra-op thread only spins, and on a busy
    machine costs 10×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def official_layout():
    """Key → shape tables of the official modules (a copy of shared/official_state_dict_layout.json)."""
    return json.loads((DATA / "official_state_dict_layout.json").read_text())


def layout_state_dict(layout: dict, seed: int = 0) -> dict:
    """A random state dict with exactly the keys and shapes of ``layout``; FIR buffers get
    the real [1,3,3,1] kernel so loaded and freshly built models agree on them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith(".kernel"):
            taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
            k = torch.outer(taps, taps)
            state[key] = k / k.sum() * (4 if "blur" in key or "upsample" in key else 1)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.5
    return state
