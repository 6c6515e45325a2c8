"""CLIP ViT-B/32 (OpenAI weights, open_clip ``ViT-B-32-quickgelu``) as MMFS uses it (SPEC §5)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.encoders.attention import FusedSelfAttention, prenorm_step
from mmfs_fast.encoders._common import ImageInput, check_images, check_weights, freeze, load_weights
from mmfs_fast.errors import EncoderWeightsError, option
from mmfs_fast.ops import linear_silu

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


QUICK_GELU_SCALE = 1.702  # open_clip's QuickGELU: x·σ(1.702·x)


class QuickGeluMLP(nn.Module):
    """open_clip's MLP c_fc → QuickGELU → c_proj with x·σ(1.702x) as silu(1.702x) / 1.702: the
    1.702 is c_fc's GEMM scale (alpha, its bias pre-scaled so the bias stays in the GEMM) and
    1/1.702 c_proj's, so the activation is a SiLU instead of three passes (scale, sigmoid,
    product), and that SiLU is c_fc's GEMM epilogue (:func:`~mmfs_fast.ops.linear_silu`).

    Holds the wrapped c_fc and c_proj under their names, so the state dict is unchanged; the
    pre-scaled bias is a buffer outside it, made again whenever a state dict is loaded."""

    def __init__(self, mlp: nn.Sequential):
        from open_clip.transformer import QuickGELU

        super().__init__()
        if not isinstance(getattr(mlp, "gelu", None), QuickGELU):
            raise ValueError("QuickGeluMLP covers open_clip's c_fc → QuickGELU → c_proj")
        self.c_fc, self.c_proj = mlp.c_fc, mlp.c_proj
        self.train(mlp.training)
        self.register_buffer("scaled_fc_bias", torch.empty_like(self.c_fc.bias), persistent=False)
        self._scale_fc_bias()
        self.register_load_state_dict_post_hook(QuickGeluMLP._scale_fc_bias)

    @torch.no_grad()
    def _scale_fc_bias(self, incompatible_keys=None) -> None:
        self.scaled_fc_bias.copy_(self.c_fc.bias * QUICK_GELU_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        hidden = linear_silu(rows, self.c_fc.weight, self.scaled_fc_bias, QUICK_GELU_SCALE)
        out = torch.addmm(self.c_proj.bias, hidden, self.c_proj.weight.t(), alpha=1 / QUICK_GELU_SCALE)
        return out.view(*x.shape[:-1], out.shape[-1])


class FusedBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-norm, no layer scale) with its attention as
    :class:`FusedSelfAttention`, its MLP as :class:`QuickGeluMLP`, and each residual add joined
    to the LayerNorm that reads the sum (:func:`prenorm_step`): the attention's to ln_2, the
    MLP's to the next block's ln_1. Holds the block's modules under their names, so the state
    dict is unchanged."""

    def __init__(self, block: nn.Module, causal: bool):
        super().__init__()
        if hasattr(block, "ln_1_kv") or not all(isinstance(getattr(block, name), nn.Identity)
                                                for name in ("ls_1", "ls_2")):
            raise ValueError("FusedBlock covers a self-attention block without layer scale (CLIP ViT-B/32's)")
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.attn = FusedSelfAttention(block.attn, causal)
        self.mlp = QuickGeluMLP(block.mlp)
        self.train(block.training)

    def get_weight_dtype(self) -> torch.dtype:
        """open_clip's Transformer casts its input to this."""
        return self.mlp.c_fc.weight.dtype

    def step(self, x: torch.Tensor, pending: torch.Tensor | None,
             attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream x + pending (see :func:`prenorm_step`)."""
        return prenorm_step(x, pending, self.ln_1, lambda h: self.attn(h, h, h, attn_mask=attn_mask)[0], self.ln_2,
                            self.mlp)

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("FusedBlock: self-attention only (no separate keys or values)")
        x, pending = self.step(q_x, None, attn_mask)
        return x + pending


class FusedTransformer(nn.Module):
    """open_clip's Transformer (batch-first) over :class:`FusedBlock` s, which pass each block's
    MLP output on unadded: the next block adds it in its first LayerNorm's pass, so only the
    tower's output (and an intermediate someone asks for) takes an add of its own. The same
    calls as open_clip's (forward, forward_intermediates, get_cast_dtype) and the same state dict."""

    def __init__(self, transformer: nn.Module, causal: bool):
        super().__init__()
        if not transformer.batch_first or transformer.grad_checkpointing:
            raise ValueError("FusedTransformer covers open_clip's batch-first Transformer without checkpointing")
        self.width, self.layers, self.batch_first = transformer.width, transformer.layers, True
        self.resblocks = nn.ModuleList(FusedBlock(block, causal) for block in transformer.resblocks)
        self.train(transformer.training)

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].get_weight_dtype()

    def forward_intermediates(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                              indices: int | list[int] | None = None,
                              stop_early: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the output, the outputs of the blocks ``indices`` picks, as open_clip's
        feature_take_indices reads it: None all, n the last n, a list those)."""
        from open_clip.utils import feature_take_indices

        take, last = feature_take_indices(len(self.resblocks), indices)
        return self._run(x, attn_mask, self.resblocks[:last + 1] if stop_early else self.resblocks, take)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, attn_mask, self.resblocks, ())[0]

    @staticmethod
    def _run(x, attn_mask, blocks, take) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pending, taken = None, []
        for n, block in enumerate(blocks):
            x, pending = block.step(x, pending, attn_mask)
            if n in take:
                x, pending = x + pending, None
                taken.append(x)
        return (x if pending is None else x + pending), taken


def fuse_blocks(model) -> None:
    """Both towers of an open_clip CLIP as :class:`FusedTransformer` s; the text transformer's
    causal mask becomes SDPA's is_causal (the model's mask buffer is dropped)."""
    model.visual.transformer = FusedTransformer(model.visual.transformer, causal=False)
    model.transformer = FusedTransformer(model.transformer, causal=True)
    model.attn_mask = None


class CLIPEncoder:
    """Frozen CLIP: no parameter gradients, but differentiable w.r.t. input images; its towers
    run fused blocks (:func:`fuse_blocks`: fused attention, a one-pass activation, residual adds
    in the LayerNorms' passes)."""

    def __init__(self, weights: str | Path | None = None, *, random_init: bool = False, device="cpu",
                 dtype: torch.dtype = torch.float32, trust_torchscript: bool = False):
        import open_clip

        path = check_weights("CLIP", weights, random_init, HOW_TO_GET, "clip_weights")
        # built from its config: create_model would log a misleading "initialized randomly" warning
        model = open_clip.CLIP(**open_clip.get_model_config(MODEL_NAME))
        if path is not None:
            load_weights(MODEL_NAME, lambda p: _load_weights(model, p, trust_torchscript), path, HOW_TO_GET)
        self.model = freeze(model, device, dtype)
        fuse_blocks(self.model)
        self.tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        self.device, self.dtype = torch.device(device), dtype
        self.image_input = ImageInput(MEAN, STD, self.device, dtype)
        self.model.visual.conv1.to(memory_format=self.image_input.memory_format)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → CLIP input (B, 3, 224, 224)."""
        check_images(x)
        return self.image_input(x, (INPUT_SIZE, INPUT_SIZE))

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
