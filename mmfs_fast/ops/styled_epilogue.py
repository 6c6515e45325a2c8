"""styled_epilogue: what follows a styled layer's convolution, in one pass over its output:
``leaky_relu(x·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength, 0.2)``.

The caller folds the activation's gain into demod, bias and strength (lrelu(z)·g = lrelu(g·z)
for g > 0), as models/inference.py does. Inference only: no backend has a backward, and
autograd refuses one (the layers that train use bias_act, which has).

Backends: ref, triton, and cuda where the loaded extension defines the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _cuda, _triton
from mmfs_fast.ops.bias_act import ACTIVATIONS

ALPHA = ACTIVATIONS["lrelu"].default_alpha


def styled_epilogue_ref(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None,
                        noise_strength: float, alpha: float) -> torch.Tensor:
    """Plain PyTorch, in fp32 (or x's dtype when wider); for fp32 x three passes, in place after the first."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.addcmul(bias.to(acc)[None, :, None, None], x.to(acc), demod.to(acc)[:, :, None, None])
    if noise is not None:
        out.add_(noise.to(acc), alpha=noise_strength)
    return F.leaky_relu_(out, alpha).to(x.dtype)


IMPLEMENTATIONS = {"ref": styled_epilogue_ref, "triton": _triton.styled_epilogue}
if _cuda.defines("styled_epilogue"):  # an extension built before the op lacks it
    IMPLEMENTATIONS["cuda"] = _cuda.styled_epilogue


def styled_epilogue(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None = None,
                    noise_strength: float = 0.0, impl: str = "auto") -> torch.Tensor:
    """``leaky_relu(x·demod[:, :, None, None] + bias[None, :, None, None] + noise·noise_strength, 0.2)``.

    x: (B, C, H, W), any float dtype, contiguous or channels_last (the result keeps its dtype and
    memory format; the arithmetic is fp32 for fp16/bf16); demod: (B, C); bias: (C,); noise: None or
    (B or 1, 1, H, W). Not differentiable (inference only).
    """
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f"styled_epilogue: x must be a 4-D floating-point tensor, got {x.ndim}-D {x.dtype}")
    batch, channels, h, w = x.shape
    if tuple(demod.shape) != (batch, channels):
        raise ValueError(f"styled_epilogue: demod must have shape {(batch, channels)}, got {tuple(demod.shape)}")
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"styled_epilogue: bias must have shape {(channels,)}, got {tuple(bias.shape)}")
    if noise is not None and (noise.ndim != 4 or noise.shape[0] not in (1, batch) or tuple(noise.shape[1:]) != (1, h, w)):
        raise ValueError(f"styled_epilogue: noise must have shape (1 or {batch}, 1, {h}, {w}), "
                         f"got {tuple(noise.shape)}")
    for name, t in (("demod", demod), ("bias", bias), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"styled_epilogue: {name} is on {t.device} but x is on {x.device}")
    if noise is not None and noise.shape[0] > 1 and noise.stride(0) == 0:
        noise = noise[:1]  # one plane expanded over the batch (the Engine's): read once, not copied per sample
    name = _backend.resolve("styled_epilogue", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, demod, bias, noise, float(noise_strength), ALPHA)
