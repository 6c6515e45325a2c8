"""Input checks shared by the Engine, the MMFS API and the micro-batcher.

:func:`check_tensor` reads only a tensor's metadata (type, shape, dtype), never its values,
so it costs no device→host sync: the hot path runs it on every call. Finiteness needs the
values; :func:`check_finite` reduces all the given tensors on their device and reads the
verdicts back in one copy: that is a sync, so the Engine runs it only when asked
(``Engine(check_finite=True)``) and the MMFS API where it copies its outputs back anyway.
"""
from __future__ import annotations

import numpy as np
import torch


SEED_LIMIT = 2 ** 63
# faces are images in [-1, 1]; a little beyond is resampling overshoot, far beyond is a
# mistake (0–255 pixels, unnormalised tensors) that would render garbage silently
FACE_RANGE = 2.0


def check_seed(seed) -> int:
    """The one seed rule (the API, the Engine, the CLI and the server): an int in [0, 2**63),
    the range of torch.Generator.manual_seed."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def faces_flags(faces: torch.Tensor) -> torch.Tensor:
    """True where the whole batch is finite and within ±FACE_RANGE, on its device (no sync);
    NaN compares false, so one reduction covers both."""
    return faces.abs().amax() <= FACE_RANGE


def check_faces(faces: torch.Tensor) -> None:
    """Raise unless ``faces`` are finite and in about [-1, 1] (one read of the verdict)."""
    if not bool(faces_flags(faces)):
        raise ValueError(f"faces must be finite images in [-1, 1]; these hold NaN, Inf or values beyond "
                         f"±{FACE_RANGE} (give x / 127.5 - 1 of 8-bit pixels)")


def check_tensor(name: str, t, shape: tuple) -> None:
    """A non-empty floating tensor of ``shape`` (None matches any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")


def finite_flags(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One bool per tensor, True where every value is finite, computed where the tensors are
    (no sync). The tensors must share a device."""
    return torch.stack([torch.isfinite(t).all() for t in tensors.values()])


def raise_unless_finite(names, flags: torch.Tensor) -> None:
    """Raise naming the first tensor whose flag (from :func:`finite_flags`) is False; reading
    the flags is the one device→host copy."""
    for name, ok in zip(names, flags.tolist()):
        if not ok:
            raise ValueError(f"{name} contains NaN or Inf")


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise if any tensor holds NaN or Inf: one reduction per device and one read back."""
    by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, {})[name] = t
    for group in by_device.values():
        raise_unless_finite(group, finite_flags(group))
