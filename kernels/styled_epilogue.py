"""styled_epilogue in Triton: ``leaky_relu(blur(x)·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength, 0.2)
· next_styles[b, c]``, in one pass over the output, which also stores the activation before the
× next_styles when asked to (a second, unscaled output of the same layout).

The kernel walks the output in memory order (NCHW or NHWC, x's layout), so every store, and
every load of x when there is no blur, is contiguous whatever the layout; it derives
(b, c, y, x) of each element from its offset to gather the per-sample, per-channel and
per-pixel factors, which stay in cache. With a blur each output gathers its KH×KW window of
x (zero outside), so the activation the transposed convolution wrote is read once. The tap
loops are unrolled at compile time (KH, KW constexpr). Inference only: there is no gradient
kernel.
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


@triton.autotune(configs=_CONFIGS,
                 key=["n", "channels", "out_h", "out_w", "CHANNELS_LAST", "HAS_NOISE", "HAS_NEXT", "HAS_BLUR",
                      "HAS_UNSCALED", "KH", "KW"])
@triton.jit
def styled_epilogue_kernel(x_ptr, demod_ptr, bias_ptr, noise_ptr, next_ptr, blur_ptr, out_ptr, unscaled_ptr, n,
                           channels, out_h, out_w, in_h, in_w, x_stride_b, x_stride_c, x_stride_y, x_stride_x, pad,
                           noise_batch_stride, noise_strength, alpha,
                           CHANNELS_LAST: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_NEXT: tl.constexpr,
                           HAS_BLUR: tl.constexpr, HAS_UNSCALED: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pixels = out_h * out_w
    b = offs // (channels * pixels)
    if CHANNELS_LAST:
        c = offs % channels
        p = (offs // channels) % pixels
    else:
        c = (offs // pixels) % channels
        p = offs % pixels
    if HAS_BLUR:
        oy, ox = p // out_w, p % out_w
        x_plane = x_ptr + b * x_stride_b + c * x_stride_c
        z = tl.zeros((BLOCK,), dtype=tl.float32)
        for ky in tl.static_range(KH):
            iy = oy + ky - pad
            row_ok = mask & (iy >= 0) & (iy < in_h)
            for kx in tl.static_range(KW):
                ix = ox + kx - pad
                ok = row_ok & (ix >= 0) & (ix < in_w)
                v = tl.load(x_plane + iy * x_stride_y + ix * x_stride_x, mask=ok, other=0.0).to(tl.float32)
                # A true convolution, as upfirdn2d: the filter is applied flipped.
                z += v * tl.load(blur_ptr + (KH - 1 - ky) * KW + (KW - 1 - kx))
    else:
        z = tl.load(x_ptr + offs, mask=mask).to(tl.float32)  # x is walked in the output's order
    y = z * tl.load(demod_ptr + b * channels + c, mask=mask) + tl.load(bias_ptr + c, mask=mask)
    if HAS_NOISE:
        y += tl.load(noise_ptr + b * noise_batch_stride + p, mask=mask).to(tl.float32) * noise_strength
    y = tl.where(y > 0, y, y * alpha)
    if HAS_UNSCALED:  # the output's layout: the same offsets
        tl.store(unscaled_ptr + offs, y.to(unscaled_ptr.dtype.element_ty), mask=mask)
    if HAS_NEXT:
        y *= tl.load(next_ptr + b * channels + c, mask=mask)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def styled_epilogue(x, demod, bias, noise, noise_strength, alpha, next_styles, blur, blur_pad, unscaled_out,
                    out_size, layout):
    """x (B, C, H, W) contiguous or channels_last; demod (B, C), bias (C,), next_styles None or
    (B, C) and blur None or (KH, KW), fp32 contiguous; noise None or (B or 1, 1, *out_size)
    contiguous. The result, (B, C, *out_size), has x's dtype and the memory format layout; unscaled_out,
    None or a tensor of the result's shape, dtype and layout, receives the activation before
    the × next_styles."""
    batch, channels, h, w = x.shape
    out_h, out_w = out_size
    out = torch.empty((batch, channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=layout)
    n = out.numel()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    kh, kw = (1, 1) if blur is None else blur.shape
    noise_batch_stride = 0 if noise is None or noise.shape[0] == 1 else out_h * out_w
    wrap_triton(styled_epilogue_kernel)[grid](
        x, demod, bias, x if noise is None else noise, x if next_styles is None else next_styles,
        x if blur is None else blur, out, out if unscaled_out is None else unscaled_out, n, channels, out_h, out_w,
        h, w, *x.stride(), blur_pad, noise_batch_stride, float(noise_strength), float(alpha),
        CHANNELS_LAST=layout == torch.channels_last, HAS_NOISE=noise is not None, HAS_NEXT=next_styles is not None,
        HAS_BLUR=blur is not None, HAS_UNSCALED=unscaled_out is not None, KH=kh, KW=kw)
    return out
