"""Loading the models from weight files (or random-initialised, for demos and tests): what
the MMFS API, the commands and the server share."""
from __future__ import annotations

import warnings

import torch

from mmfs_fast.errors import UsageError, option
from mmfs_fast.models import Stylizer, StylizerConfig

RANDOM_INIT_WARNING = ("mmfs_fast: RANDOM-INITIALISED weights (no checkpoint given): outputs are noise-like and "
                       "meaningless. Pass a checkpoint for real stylization.")
RANDOM_CLIP_WARNING = "mmfs_fast: RANDOM-INITIALISED CLIP: text and reference styles are meaningless"
# the random-initialised models are seeded so that demos and tests are repeatable
RANDOM_INIT_SEED = 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_stylizer(ckpt=None, device=None, dtype=torch.float32, impl: str = "auto", random_init: bool = False,
                  config: StylizerConfig | None = None, allow_cast: bool = False) -> Stylizer:
    """A Stylizer from a checkpoint (official .pt/.pth, bare state dict, StyleGAN2 or our
    safetensors), or with ``random_init`` and no checkpoint a seeded random one from
    ``config``, with a loud warning."""
    device = torch.device(device) if device is not None else default_device()
    if ckpt is not None:
        if config is not None:
            raise ValueError("config applies to random-initialised models only; a checkpoint has its own")
        return Stylizer.from_checkpoint(ckpt, device=device, dtype=dtype, impl=impl, allow_cast=allow_cast)
    if not random_init:
        raise UsageError(f"no weights: pass {option('ckpt')}, or {option('random_init')} for a "
                         "random-initialised model (demos and tests only)")
    warnings.warn(RANDOM_INIT_WARNING, stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        stylizer = Stylizer(config, impl=impl)
    return stylizer.to(device=device, dtype=dtype)


def load_clip(weights=None, device=None, dtype=torch.float32, trust_torchscript: bool = False):
    """The CLIP encoder of OpenAI's ViT-B-32.pt ``weights``, or with None a seeded random one,
    with a loud warning. ``trust_torchscript``: accept a TorchScript archive (its code runs)."""
    from mmfs_fast.encoders import CLIPEncoder

    device = torch.device(device) if device is not None else default_device()
    if weights is not None:
        return CLIPEncoder(weights, device=device, dtype=dtype, trust_torchscript=trust_torchscript)
    warnings.warn(RANDOM_CLIP_WARNING, stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return CLIPEncoder(random_init=True, device=device, dtype=dtype)
