"""DINO ViT-B/8 (timm ``vit_base_patch8_224.dino``) keys for the structure loss (SPEC §5)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmfs_fast.encoders._common import (ImageInput, check_images, check_weights, freeze, load_weights,
                                       without_autocast)

MODEL_NAME = "vit_base_patch8_224.dino"
PATCH = 8
SHORT_SIDE = 224
MAX_LONG_SIDE = 480
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_GET = ("Use DINO's dino_vitbase8_pretrain.pth (facebookresearch/dino) or a timm "
              "vit_base_patch8_224.dino state dict saved with torch.save / safetensors.")
# where DINO's own training checkpoints nest and prefix the backbone weights
_NESTING_KEYS = ("teacher", "state_dict", "model")
_PREFIXES = ("module.", "backbone.")


def input_size(height: int, width: int) -> tuple[int, int]:
    """Shorter side 224, longer side scaled alike (≤ 480), both multiples of the patch size."""
    scale = SHORT_SIDE / min(height, width)

    def side(n: int) -> int:
        return min(MAX_LONG_SIDE, max(SHORT_SIDE, round(n * scale / PATCH) * PATCH))

    return side(height), side(width)


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _NESTING_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, found {type(state).__name__}")
    for prefix in _PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}  # DINO's projection head


def _load_weights(model, path: Path) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    model.load_state_dict(checkpoint_filter_fn(_read_state(path), model))


class DINOEncoder:
    """Frozen DINO ViT-B/8: no parameter gradients, but differentiable w.r.t. input images."""

    def __init__(self, weights: str | Path | None = None, *, random_init: bool = False, device="cpu",
                 dtype: torch.dtype = torch.float32, antialias: bool = False):
        """``antialias``: how images are resized to DINO's input. False (the default) is the official
        MMFS code's resize (torchvision 0.12's tensor ``Resize``, which does not antialias), so
        the structure loss and its gradient are the ones the published models were trained
        with; True low-pass filters first, which weighs every source pixel instead of aliasing
        512² detail into the 224² input: pick it for new training runs, not to reproduce."""
        import timm

        path = check_weights("DINO", weights, random_init, HOW_TO_GET, "dino_weights")
        # dynamic_img_size: non-square inputs up to 480 px interpolate the 224² position embedding
        model = timm.create_model(MODEL_NAME, pretrained=False, dynamic_img_size=True)
        if path is not None:
            load_weights(MODEL_NAME, lambda p: _load_weights(model, p), path, HOW_TO_GET)
        self.model = freeze(model, device, dtype)
        self.device, self.dtype, self.antialias = torch.device(device), dtype, antialias
        self.image_input = ImageInput(IMAGENET_MEAN, IMAGENET_STD, self.device, dtype)
        self.model.patch_embed.proj.to(memory_format=self.image_input.memory_format)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        size = input_size(*x.shape[-2:])
        return self.image_input(x, size, self.antialias)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, N, 768) float32 keys of the last block, CLS
        included, heads concatenated."""
        vit = self.model
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(self.preprocess(x)))))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        last = vit.blocks[-1]
        width = last.attn.qkv.in_features
        # qkv's output is laid out (q | k | v), each heads-major: the k third is the concatenated keys
        k_weight = last.attn.qkv.weight[width:2 * width]
        k_bias = None if last.attn.qkv.bias is None else last.attn.qkv.bias[width:2 * width]
        return F.linear(last.norm1(tokens), k_weight, k_bias).float()

    def self_similarity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, N) cosine self-similarity of the last block's keys; in fp32 under autocast too
        (a loss statistic: bf16 keeps 3 digits of similarities the loss compares)."""
        k = F.normalize(self.keys(x), dim=-1)
        with without_autocast(k.device):
            return k @ k.transpose(1, 2)
