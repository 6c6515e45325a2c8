"""styled_epilogue: what follows a styled layer's convolution, in one pass over its output:
``leaky_relu(blur(x)·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength, 0.2) · next_styles[b, c]``.

blur (optional) is the FIR after a transposed convolution (upfirdn2d with up = down = 1 and a
symmetric pad), so the upsampled activation is read once instead of written and read again;
next_styles (optional) is the next modulated convolution's input scaling x·s, so that
convolution reads its input ready; unscaled_out (optional) receives the activation before that
scaling too, for a second reader (ToRGB) of the same output. The activation's gain is the
caller's to fold into its inputs (lrelu(z)·g = lrelu(g·z) for g > 0), as models/inference.py
does. Inference only: no backend has a backward, and autograd refuses one (the layers that train
use bias_act, which has).

Backends: ref, triton, and cuda where the loaded extension defines the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfs_fast.ops import _backend, _cuda, _triton
from mmfs_fast.ops._common import blurred_size, check_on_x_device, output_memory_format
from mmfs_fast.ops.bias_act import ACTIVATIONS
from mmfs_fast.ops.upfirdn2d import upfirdn2d_ref

ALPHA = ACTIVATIONS["lrelu"].default_alpha


def styled_epilogue_ref(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None,
                        noise_strength: float, alpha: float, next_styles: torch.Tensor | None,
                        blur: torch.Tensor | None, blur_pad: int, unscaled_out: torch.Tensor | None) -> torch.Tensor:
    """Plain PyTorch, in fp32 (or x's dtype when wider): the blur, then three passes in place."""
    acc = torch.promote_types(x.dtype, torch.float32)
    z = x.to(acc) if blur is None else upfirdn2d_ref(x.to(acc), blur.to(acc), 1, 1, (blur_pad,) * 4)
    out = torch.addcmul(bias.to(acc)[None, :, None, None], z, demod.to(acc)[:, :, None, None])
    if noise is not None:
        out.add_(noise.to(acc), alpha=noise_strength)
    out = F.leaky_relu_(out, alpha)
    if unscaled_out is not None:
        unscaled_out.copy_(out)
    if next_styles is not None:
        out.mul_(next_styles.to(acc)[:, :, None, None])
    return out.to(x.dtype)


IMPLEMENTATIONS = {"ref": styled_epilogue_ref, "triton": _triton.styled_epilogue}
if _cuda.defines("styled_epilogue"):  # an extension built before the op lacks it
    IMPLEMENTATIONS["cuda"] = _cuda.styled_epilogue


def _check(x, demod, bias, noise, next_styles, blur, blur_pad, unscaled_out) -> None:
    """The other inputs' shapes, dtypes and devices checked against x and the output's size."""
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f"styled_epilogue: x must be a 4-D floating-point tensor, got {x.ndim}-D {x.dtype}")
    batch, channels, h, w = x.shape
    if blur is not None:
        if blur.ndim != 2 or min(blur.shape) < 1 or not blur.is_floating_point():
            raise ValueError(f"styled_epilogue: blur must be a non-empty 2-D floating-point FIR, got "
                             f"{tuple(blur.shape)} {blur.dtype}")
        if not isinstance(blur_pad, int) or isinstance(blur_pad, bool) or blur_pad < 0:
            raise ValueError(f"styled_epilogue: blur_pad must be an int >= 0, got {blur_pad!r}")
        h, w = blurred_size(x, blur, blur_pad)
        if h < 1 or w < 1:
            raise ValueError(f"styled_epilogue: a {tuple(blur.shape)} blur with pad {blur_pad} leaves nothing of "
                             f"x's {tuple(x.shape[2:])}")
    elif blur_pad:
        raise ValueError("styled_epilogue: blur_pad is given without a blur")
    for name, t in (("demod", demod), ("next_styles", next_styles)):
        if t is not None and tuple(t.shape) != (batch, channels):
            raise ValueError(f"styled_epilogue: {name} must have shape {(batch, channels)}, got {tuple(t.shape)}")
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"styled_epilogue: bias must have shape {(channels,)}, got {tuple(bias.shape)}")
    if noise is not None and (noise.ndim != 4 or noise.shape[0] not in (1, batch) or tuple(noise.shape[1:]) != (1, h, w)):
        raise ValueError(f"styled_epilogue: noise must have shape (1 or {batch}, 1, {h}, {w}), "
                         f"got {tuple(noise.shape)}")
    if unscaled_out is not None:
        layout = output_memory_format(x)
        if next_styles is None:
            raise ValueError("styled_epilogue: unscaled_out is given without next_styles (it would equal the result)")
        if tuple(unscaled_out.shape) != (batch, channels, h, w) or unscaled_out.dtype != x.dtype or \
                not unscaled_out.is_contiguous(memory_format=layout):
            raise ValueError(f"styled_epilogue: unscaled_out must be a {x.dtype} tensor of shape {(batch, channels, h, w)}"
                             f", dense in the result's layout ({layout}); got {tuple(unscaled_out.shape)} "
                             f"{unscaled_out.dtype} with strides {unscaled_out.stride()}")
    check_on_x_device("styled_epilogue", x, demod=demod, bias=bias, noise=noise, next_styles=next_styles, blur=blur,
                      unscaled_out=unscaled_out)


def styled_epilogue(x: torch.Tensor, demod: torch.Tensor, bias: torch.Tensor, noise: torch.Tensor | None = None,
                    noise_strength: float = 0.0, next_styles: torch.Tensor | None = None,
                    blur: torch.Tensor | None = None, blur_pad: int = 0, unscaled_out: torch.Tensor | None = None,
                    impl: str = "auto") -> torch.Tensor:
    """``leaky_relu(blur(x)·demod[:, :, None, None] + bias[None, :, None, None] + noise·noise_strength, 0.2)
    · next_styles[:, :, None, None]``.

    x: (B, C, H, W), any float dtype, contiguous or channels_last (the result keeps its dtype and
    memory format; the arithmetic is fp32 for fp16/bf16); demod: (B, C); bias: (C,); noise: None or
    (B or 1, 1, H', W') with (H', W') the output's size; next_styles: None or (B, C); blur: None or
    2-D FIR taps, applied as ``upfirdn2d(x, blur, pad=blur_pad)`` (true convolution, zero padding
    blur_pad on every side: H' = H + 2·blur_pad − kh + 1); unscaled_out: None, or a tensor of the
    result's shape, dtype and layout (``torch.empty_like`` of x without a blur) that is also
    written, with the activation before the × next_styles: for an output with a second reader
    that needs it unscaled (ToRGB), in the same pass. Not differentiable (inference only).
    """
    _check(x, demod, bias, noise, next_styles, blur, blur_pad, unscaled_out)
    if noise is not None and noise.shape[0] > 1 and noise.stride(0) == 0:
        noise = noise[:1]  # one plane expanded over the batch (the Engine's): read once, not copied per sample
    name = _backend.resolve("styled_epilogue", impl, IMPLEMENTATIONS, x)
    return IMPLEMENTATIONS[name](x, demod, bias, noise, float(noise_strength), ALPHA, next_styles, blur, blur_pad,
                                 unscaled_out)
