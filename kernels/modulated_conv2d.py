"""Modulated convolution in Triton: one batched implicit GEMM per call.

    out[b, o] = demod[b, o] · Σ_{i, taps} W[o, i, tap] · styles[b, i] · x[b, i, pixel + tap]

GEMM view per sample: M = output channels, N = output pixels, K = input channels ×
taps. The shared weight tile is modulated by ``styles`` as it is loaded, the input
tile is gathered straight from x (no im2col buffer) and the demodulation is a
per-row scale in the epilogue, so no per-sample weight tensor is ever written.

Modes: UP=1 is a convolution with ``STRIDE`` and ``padding``; UP=2 is a transposed
convolution with stride 2 (``padding`` crops the full output). The transposed one
is split into its 2×2 output phases (one program each): a phase only meets the taps
of its parity, ceil(K/2)² of them, so tensor cores do not multiply the 3/4 zeros of
a zero-inserted input. The same two modes give the input gradient of each other.
"""
import triton
import triton.language as tl
from torch.library import wrap_triton

from mmfs_fast.kernels._config import autotune_configs

# Tile candidates for Hopper/Ampere (BLOCK_M out channels × BLOCK_N pixels, BLOCK_K deep);
# BLOCK_M=16 serves the 3-channel ToRGB. GPU timing pending: no GPU in the writing session.
_CONFIGS = autotune_configs(
    full=[dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in (
        (128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3),
        (64, 256, 32, 8, 3), (16, 128, 64, 4, 3))],
    interpreted=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=1))


@triton.autotune(configs=_CONFIGS, key=["in_ch", "out_ch", "out_h", "out_w", "KSIZE", "UP", "STRIDE"])
@triton.jit
def modulated_conv2d_kernel(
        x_ptr, w_ptr, styles_ptr, demod_ptr, out_ptr,
        in_ch, in_h, in_w, out_ch, out_h, out_w, padding,
        KSIZE: tl.constexpr, UP: tl.constexpr, STRIDE: tl.constexpr, HAS_DEMOD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    TAPS: tl.constexpr = (KSIZE + UP - 1) // UP  # taps per axis that one output phase meets
    b = tl.program_id(2) // (UP * UP)
    phase = tl.program_id(2) % (UP * UP)
    phase_y = phase // UP
    phase_x = phase % UP

    # Output pixels of this tile, on the grid of this phase.
    grid_h = (out_h + UP - 1) // UP
    grid_w = (out_w + UP - 1) // UP
    pix = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    oy = (pix // grid_w) * UP + phase_y
    ox = (pix % grid_w) * UP + phase_x
    pix_ok = (pix < grid_h * grid_w) & (oy < out_h) & (ox < out_w)
    if UP == 1:
        kh0 = 0
        kw0 = 0
        iy0 = oy * STRIDE - padding
        ix0 = ox * STRIDE - padding
    else:
        # Full-output row Y = oy + padding gathers x[(Y - kh) / 2] for the kh of Y's parity.
        kh0 = (phase_y + padding) % 2
        kw0 = (phase_x + padding) % 2
        iy0 = (oy + padding - kh0) // 2
        ix0 = (ox + padding - kw0) // 2

    o = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o < out_ch
    x_batch = x_ptr + b.to(tl.int64) * in_ch * in_h * in_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_ch * TAPS * TAPS, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ci = kk // (TAPS * TAPS)
        th = (kk // TAPS) % TAPS
        tw = kk % TAPS
        kh = kh0 + UP * th
        kw = kw0 + UP * tw
        k_ok = (ci < in_ch) & (kh < KSIZE) & (kw < KSIZE)

        w_offs = o[:, None] * (in_ch * KSIZE * KSIZE) + (ci * KSIZE * KSIZE + kh * KSIZE + kw)[None, :]
        w = tl.load(w_ptr + w_offs, mask=o_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(styles_ptr + b * in_ch + ci, mask=ci < in_ch, other=0.0).to(tl.float32)
        w = (w * s[None, :]).to(x_ptr.dtype.element_ty)

        if UP == 1:
            iy = iy0[None, :] + th[:, None]
            ix = ix0[None, :] + tw[:, None]
        else:
            iy = iy0[None, :] - th[:, None]
            ix = ix0[None, :] - tw[:, None]
        x_ok = k_ok[:, None] & pix_ok[None, :] & (iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w)
        xv = tl.load(x_batch + ci[:, None] * (in_h * in_w) + iy * in_w + ix, mask=x_ok, other=0.0)
        acc = tl.dot(w, xv, acc, input_precision=DOT_PRECISION)

    if HAS_DEMOD:
        acc *= tl.load(demod_ptr + b * out_ch + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    out_offs = (b.to(tl.int64) * out_ch + o[:, None]) * (out_h * out_w) + (oy * out_w + ox)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & pix_ok[None, :])


def modulated_conv2d(x, weight, styles, demod, up, stride, padding, out_h, out_w, dot_precision):
    """x (B, I, H, W), weight (O, I, k, k), styles (B, I), demod (B, O) or None; all contiguous.
    Returns (B, O, out_h, out_w) in x's dtype."""
    batch, in_ch, in_h, in_w = x.shape
    out_ch, _, ksize, _ = weight.shape
    out = x.new_empty((batch, out_ch, out_h, out_w))

    def grid(meta):
        pixels = triton.cdiv(out_h, up) * triton.cdiv(out_w, up)
        return (triton.cdiv(pixels, meta["BLOCK_N"]), triton.cdiv(out_ch, meta["BLOCK_M"]), batch * up * up)

    wrap_triton(modulated_conv2d_kernel)[grid](
        x, weight, styles, styles if demod is None else demod, out,
        in_ch, in_h, in_w, out_ch, out_h, out_w, padding,
        KSIZE=ksize, UP=up, STRIDE=stride, HAS_DEMOD=demod is not None, DOT_PRECISION=dot_precision)
    return out
