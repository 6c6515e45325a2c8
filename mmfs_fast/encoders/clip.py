"""CLIP ViT-B/32 (OpenAI weights, open_clip ``ViT-B-32-quickgelu``) as MMFS uses it (SPEC §5)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.encoders._common import Normalize, check_images, check_weights, freeze, load_weights, resize
from mmfs_fast.errors import EncoderWeightsError, option

MODEL_NAME = "ViT-B-32-quickgelu"
INPUT_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TOKEN_BLOCK = 3  # "layer-4 tokens": output of visual transformer block index 3
HOW_TO_GET = ("Use OpenAI's ViT-B-32.pt (the file the `clip` package or open_clip's pretrained='openai' "
              "download), or an open_clip ViT-B-32-quickgelu state dict saved with torch.save / safetensors.")
# entries of OpenAI's TorchScript state dict that are hyper-parameters, not weights
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _load_weights(model, path: Path, trust_torchscript: bool) -> None:
    import open_clip

    if _is_torchscript(path):
        if not trust_torchscript:
            # torch.jit.load runs the archive's code, which weights_only does not cover
            raise EncoderWeightsError(
                f"{path}: a TorchScript archive (OpenAI's original ViT-B-32.pt is one): loading it runs the code "
                f"inside, so it is refused unless you trust the file: pass {option('trust_torchscript')}, or "
                "convert it once to a plain state dict")
        # OpenAI's original release is a TorchScript archive; only its tensors are used
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in _OPENAI_SCALARS:
            state.pop(key, None)
        model.load_state_dict(state)
    else:
        open_clip.load_checkpoint(model, str(path))


class FusedSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (eval: no dropout) with the softmax(QKᵀ/√d)V in
    one F.scaled_dot_product_attention call, the fused flash / memory-efficient kernel on CUDA
    (no (B, heads, L, L) scores in memory, one launch inside a CUDA graph).

    Holds the wrapped module's own parameters under its names (in_proj_weight, in_proj_bias,
    out_proj), so the state dict is unchanged. causal: the additive causal mask of CLIP's text
    transformer as SDPA's is_causal, which keeps the flash kernel (it takes no explicit mask)."""

    def __init__(self, attention: nn.MultiheadAttention, causal: bool):
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("FusedSelfAttention covers CLIP's attention: one in-projection, no bias_k/v, "
                             "no zero attention")
        self.num_heads, self.batch_first, self.causal = attention.num_heads, attention.batch_first, causal
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias
        self.out_proj = attention.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if not (key is query and value is query) or need_weights or (self.causal and attn_mask is not None):
            raise ValueError("FusedSelfAttention: self-attention only (key and value are the query), no "
                             "attention weights, and a causal one takes no explicit mask")
        x = query if self.batch_first else query.transpose(0, 1)
        b, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(
            b, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def fuse_attention(model) -> None:
    """Every attention of an open_clip CLIP through :class:`FusedSelfAttention`; the text
    transformer's causal mask becomes SDPA's is_causal (the model's mask buffer is dropped)."""
    for tower, causal in ((model.visual.transformer, False), (model.transformer, True)):
        for block in tower.resblocks:
            block.attn = FusedSelfAttention(block.attn, causal)
    model.attn_mask = None


class CLIPEncoder:
    """Frozen CLIP: no parameter gradients, but differentiable w.r.t. input images; its
    attention runs as fused SDPA (:func:`fuse_attention`)."""

    def __init__(self, weights: str | Path | None = None, *, random_init: bool = False, device="cpu",
                 dtype: torch.dtype = torch.float32, trust_torchscript: bool = False):
        import open_clip

        path = check_weights("CLIP", weights, random_init, HOW_TO_GET, "clip_weights")
        # built from its config: create_model would log a misleading "initialized randomly" warning
        model = open_clip.CLIP(**open_clip.get_model_config(MODEL_NAME))
        if path is not None:
            load_weights(MODEL_NAME, lambda p: _load_weights(model, p, trust_torchscript), path, HOW_TO_GET)
        self.model = freeze(model, device, dtype)
        fuse_attention(self.model)
        self.tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        self.device, self.dtype = torch.device(device), dtype
        self.normalize = Normalize(MEAN, STD, self.device, dtype)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → CLIP input (B, 3, 224, 224)."""
        check_images(x)
        return self.normalize(resize(x.to(self.device), (INPUT_SIZE, INPUT_SIZE), self.dtype))

    def _forward(self, pixels: torch.Tensor, embedding: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(L2-normalised embedding or None, block-3 tokens without CLS) of preprocessed pixels;
        without the embedding the blocks after the tokens are skipped."""
        out = self.model.visual.forward_intermediates(
            pixels, indices=[TOKEN_BLOCK], stop_early=not embedding, intermediates_only=not embedding,
            output_fmt="NLC")
        emb = F.normalize(out["image_features"].float(), dim=-1) if embedding else None
        return emb, out["image_intermediates"][0].float()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → L2-normalised (B, 512) float32 embeddings."""
        return self._forward(self.preprocess(x), embedding=True)[0]

    def layer4_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, 49, 768) float32 block-3 tokens, CLS dropped."""
        return self._forward(self.preprocess(x), embedding=False)[1]

    def encode_image_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` and :meth:`layer4_tokens` from one forward pass."""
        return self._forward(self.preprocess(x), embedding=True)

    def encode_pil(self, images: Iterable) -> torch.Tensor:
        """Reference images (PIL images or file paths) with CLIP's standard preprocessing →
        L2-normalised (B, 512) float32 embeddings."""
        return self.encode_pil_and_tokens(images)[0]

    def encode_pil_and_tokens(self, images: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_pil` and the layer-4 tokens of the same preprocessed images."""
        import open_clip

        from PIL import Image

        transform = open_clip.image_transform(INPUT_SIZE, is_train=False, mean=MEAN, std=STD)
        batch = []
        for image in images:
            if not isinstance(image, Image.Image):
                try:
                    with Image.open(image) as f:
                        image = f.convert("RGB")
                except (OSError, ValueError, TypeError) as e:
                    raise ValueError(f"cannot read reference image {image!r}: {e}") from e
            batch.append(transform(image.convert("RGB")))
        if not batch:
            raise ValueError("encode_pil needs at least one image")
        return self._forward(torch.stack(batch).to(device=self.device, dtype=self.dtype), embedding=True)

    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        """Prompts → L2-normalised (B, 512) float32 embeddings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode_text needs at least one prompt")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text prompts must be non-empty strings, got {t!r}")
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
