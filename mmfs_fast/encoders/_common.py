"""What the CLIP and DINO wrappers share: weight-file handling, freezing, resizing."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.errors import EncoderWeightsError, one_line, option


def check_weights(name: str, weights, random_init: bool, how_to_get: str, weights_option: str) -> Path | None:
    """The weights path to load, or None for an explicitly requested random model;
    ``weights_option``: the name of the option that gives them (mmfs_fast.errors.OPTIONS)."""
    if weights is None:
        if random_init:
            return None
        raise EncoderWeightsError(
            f"{name} needs a local weights file ({option(weights_option)}); nothing is downloaded. {how_to_get} "
            f"Pass {option('random_init')} only for tests: a random {name} gives meaningless features.")
    if random_init:
        raise ValueError(f"{name}: give either weights or random_init=True, not both")
    path = Path(weights)
    if not path.is_file():
        raise EncoderWeightsError(f"{name} weights: no such file {path}. {how_to_get}")
    return path


def load_weights(model_name: str, load, path: Path, how_to_get: str) -> None:
    """Run ``load(path)``, turning whatever goes wrong into one clear error."""
    try:
        load(path)
    except EncoderWeightsError:
        raise
    except Exception as e:  # torch/open_clip/timm raise many types for foreign files and mismatched keys
        raise EncoderWeightsError(f"{path}: not usable as {model_name} weights ({one_line(e)}). "
                                  f"{how_to_get}") from None


def freeze(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Evaluation mode, no parameter gradients; inputs keep theirs, so losses backprop through it."""
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point in [-1, 1], got {x.dtype}")


class ImageInput:
    """Images in [-1, 1] → an encoder's input in ``dtype``: a bilinear resize to its size, then
    (x/2 + 1/2 - mean) / std per channel. A bilinear resize (antialiased or not) weighs its taps
    to a sum of 1, so it commutes with the per-channel affine: the resize runs on the images as
    they come and the whole affine is one multiply-add after it, written in ``dtype`` where no
    gradient is asked (two kernels, not six).

    Computed in at least fp32 before the cast: the CPU has no antialiased resize for bf16, and the
    224² output is small. In half precision the input is channels-last (:attr:`memory_format`,
    the encoder's patch embedding takes it too): cuDNN's half convolutions are NHWC kernels, which
    an NCHW input is transposed around. The affine's coefficients are put on the device once:
    built from host values on every call they were host→device copies, which wait for the GPU."""

    def __init__(self, mean, std, device, dtype: torch.dtype):
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self.scale = (0.5 / std).float().view(1, 3, 1, 1).to(device)
        self.shift = ((0.5 - mean) / std).float().view(1, 3, 1, 1).to(device)
        self.dtype = dtype
        half = dtype in (torch.float16, torch.bfloat16)
        self.memory_format = torch.channels_last if half else torch.contiguous_format

    def __call__(self, x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
        x = x.to(device=self.scale.device, dtype=torch.promote_types(x.dtype, torch.float32))
        resized = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        if resized.requires_grad:  # out= has no autograd
            return torch.addcmul(self.shift, resized, self.scale).to(self.dtype, memory_format=self.memory_format)
        out = torch.empty(resized.shape, dtype=self.dtype, device=resized.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, resized, self.scale, out=out)


def without_autocast(device: torch.device):
    """A context computing in the tensors' own precision even inside an autocast region."""
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta tensors
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
