"""styled_epilogue in Triton: ``leaky_relu(x·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength, 0.2)``,
elementwise, in one pass over x.

The kernel walks x in memory order (NCHW or NHWC), so every load and store of the activation
is contiguous whatever the layout, and derives (b, c, pixel) of each element from its offset
to gather the per-sample, per-channel and per-pixel factors, which stay in cache. Inference
only: there is no gradient kernel.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from mmfs_fast.kernels._config import autotune_configs

# Memory bound: the planes run from 4×4×512 to 512×512×64 elements per sample, so the
# autotuner chooses the block per size among small and large ones.
_CONFIGS = autotune_configs(
    full=[{"BLOCK": b, "num_warps": w} for b, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))],
    interpreted={"BLOCK": 256, "num_warps": 1})


@triton.autotune(configs=_CONFIGS, key=["n", "channels", "pixels", "CHANNELS_LAST", "HAS_NOISE"])
@triton.jit
def styled_epilogue_kernel(x_ptr, demod_ptr, bias_ptr, noise_ptr, out_ptr, n, channels, pixels,
                           noise_batch_stride, noise_strength, alpha,
                           CHANNELS_LAST: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    per_sample = channels * pixels
    b = offs // per_sample
    if CHANNELS_LAST:
        c = offs % channels
        p = (offs // channels) % pixels
    else:
        c = (offs // pixels) % channels
        p = offs % pixels
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = x * tl.load(demod_ptr + b * channels + c, mask=mask) + tl.load(bias_ptr + c, mask=mask)
    if HAS_NOISE:
        y += tl.load(noise_ptr + b * noise_batch_stride + p, mask=mask).to(tl.float32) * noise_strength
    y = tl.where(y > 0, y, y * alpha)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def styled_epilogue(x, demod, bias, noise, noise_strength, alpha):
    """x (B, C, H, W) contiguous or channels_last; demod (B, C) and bias (C,) fp32 contiguous;
    noise None or (B or 1, 1, H, W) contiguous. The result has x's dtype and memory format."""
    batch, channels, h, w = x.shape
    channels_last = not x.is_contiguous()
    out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n = x.numel()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    noise_batch_stride = 0 if noise is None or noise.shape[0] == 1 else h * w
    wrap_triton(styled_epilogue_kernel)[grid](
        x, demod, bias, x if noise is None else noise, out, n, channels, h * w, noise_batch_stride,
        float(noise_strength), float(alpha), CHANNELS_LAST=channels_last, HAS_NOISE=noise is not None)
    return out
