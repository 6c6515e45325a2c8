"""Image folders for training: recursive, bad files skipped with one warning each, and a
sample order that depends only on (seed, rank, step) so that a resumed run sees exactly
the batches an uninterrupted one would."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from mmfs_fast.io import IMAGE_SUFFIXES, ImageError, open_rgb, pil_to_tensor


def _usable(path: Path, min_size: int) -> str | None:
    """Why ``path`` cannot be trained on, or None. Reads the header only: fast on big folders."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"unreadable ({e})"
    if min(width, height) < min_size:
        return f"too small ({width}x{height} < {min_size} px)"
    return None


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive, sorted), as (3, size, size) tensors in [-1, 1]."""

    def __init__(self, root, size: int, min_size: int = 64):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: no such image folder")
        self.paths = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if problem := _usable(path, min_size):
                warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
            else:
                self.paths.append(path)
        if not self.paths:
            raise ValueError(f"{self.root}: no usable images (looked for {', '.join(IMAGE_SUFFIXES)}, "
                             f"at least {min_size} px)")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # A file whose header read fine can still fail to decode: warn and take the next one,
        # which keeps the batch order deterministic.
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return pil_to_tensor(open_rgb(path), self.size)
            except ImageError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
        raise ValueError(f"{self.root}: none of the images decodes")


class StepSampler(Sampler):
    """An endless index stream: epoch e is a permutation seeded by (seed, e), dealt out
    round-robin to the ranks; the stream starts at sample ``start`` of this rank."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def __iter__(self):
        position = self.start * self.world_size + self.rank  # in the global stream
        while True:
            epoch, offset = divmod(position, self.n)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            while offset < self.n:
                yield int(order[offset])
                offset += self.world_size
            position = epoch * self.n + offset


def batches(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start_step: int,
            workers: int, device):
    """Endless iterator of (batch_size, 3, H, W) batches on ``device`` from step ``start_step`` on."""
    sampler = StepSampler(len(dataset), seed, rank, world_size, start_step * batch_size)
    # its own generator: creating the loader must not draw from the global RNG (exact resume)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
                        pin_memory=torch.device(device).type == "cuda")
    for batch in loader:
        yield batch.to(device, non_blocking=True)
