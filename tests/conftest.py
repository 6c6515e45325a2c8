import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


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
