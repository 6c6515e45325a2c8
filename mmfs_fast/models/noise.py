"""Per-layer noise inputs of the synthesis networks."""
from __future__ import annotations

import torch

NoiseSpec = str | list | tuple
NOISE_MODES = ("random", "fixed", "zero")  # the named modes; a list of maps is the explicit form


def make_noises(noise: NoiseSpec, batch: int, resolutions: list[int], device, dtype,
                generator: torch.Generator | None = None) -> list[torch.Tensor | None]:
    """One noise map (or None for no noise) per conv layer.

    noise: "random" draws independent N(0, 1) maps for every face (the official behaviour,
    reproducible with ``generator``); "fixed" draws one set and shares it across the batch
    (a caller that keeps the maps, as the video path does, reuses them for every frame so the
    output does not flicker); "zero" disables noise; a list gives explicit (B or 1, 1, H, W)
    maps in layer order.
    """
    if isinstance(noise, str):
        if noise == "zero":
            return [None] * len(resolutions)
        if noise in ("random", "fixed"):
            drawn = batch if noise == "random" else 1
            return [torch.randn(drawn, 1, r, r, device=device, dtype=dtype, generator=generator)
                    .expand(batch, -1, -1, -1) for r in resolutions]
        raise ValueError(f"noise must be one of {NOISE_MODES} or a list of tensors, got {noise!r}")
    noise = list(noise)
    if len(noise) != len(resolutions):
        raise ValueError(f"noise: expected {len(resolutions)} tensors (one per conv layer), got {len(noise)}")
    for i, (n, r) in enumerate(zip(noise, resolutions)):
        if not isinstance(n, torch.Tensor) or n.shape not in ((batch, 1, r, r), (1, 1, r, r)):
            shape = tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
            raise ValueError(f"noise[{i}]: expected shape ({batch}, 1, {r}, {r}), got {shape}")
    return [n.to(device=device, dtype=dtype) for n in noise]
