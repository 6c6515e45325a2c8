"""upfirdn2d in Triton: zero-insertion upsampling, padding/cropping, FIR filtering and
downsampling fused into one pass that reads each input pixel straight from memory.

Each program computes a tile of output pixels of one (n, c) plane. The tap loops are
unrolled at compile time (KH, KW, UP, DOWN are constexpr), so the 4×4 FIR of every
MMFS resampling gets its own specialised kernel with 16 fixed taps; taps that land on
an inserted zero or outside the image are masked loads that touch no memory.
The backward pass is this same kernel on the flipped filter (see ``mmfs_fast.ops._common.adjoint_pads``).
"""
import triton
import triton.language as tl
from torch.library import wrap_triton

from mmfs_fast.kernels._config import autotune_configs

# Output tile sizes: MMFS planes run from 8×8 (encoder end) to 512×512, so the autotuner
# chooses per shape among small and large tiles.
_CONFIGS = autotune_configs(
    full=[{"BLOCK": b, "num_warps": w} for b, w in ((128, 4), (256, 4), (512, 4), (1024, 8))],
    interpreted={"BLOCK": 64, "num_warps": 1})


@triton.autotune(configs=_CONFIGS, key=["out_h", "out_w", "KH", "KW", "UP", "DOWN"])
@triton.jit
def upfirdn2d_kernel(x_ptr, k_ptr, out_ptr, in_h, in_w, out_h, out_w, pad_x0, pad_y0,
                     KH: tl.constexpr, KW: tl.constexpr, UP: tl.constexpr, DOWN: tl.constexpr,
                     BLOCK: tl.constexpr):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < out_h * out_w
    # Top-left corner of each output's window in the upsampled, padded grid.
    uy0 = (offs // out_w) * DOWN - pad_y0
    ux0 = (offs % out_w) * DOWN - pad_x0
    x_plane = x_ptr + plane * in_h * in_w
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ky in tl.static_range(KH):
        uy = uy0 + ky
        row_ok = inside & (uy >= 0) & (uy % UP == 0) & (uy < in_h * UP)
        for kx in tl.static_range(KW):
            ux = ux0 + kx
            ok = row_ok & (ux >= 0) & (ux % UP == 0) & (ux < in_w * UP)
            v = tl.load(x_plane + (uy // UP) * in_w + ux // UP, mask=ok, other=0.0).to(tl.float32)
            # A true convolution: the filter is applied flipped.
            acc += v * tl.load(k_ptr + (KH - 1 - ky) * KW + (KW - 1 - kx)).to(tl.float32)
    tl.store(out_ptr + plane * out_h * out_w + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def upfirdn2d(x, kernel, up, down, pad, out_size):
    """x (N, C, H, W) contiguous, kernel (KH, KW) contiguous, pad (x0, x1, y0, y1), out_size (H, W)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out_h, out_w = out_size
    out = x.new_empty((n, c, out_h, out_w))

    def grid(meta):
        return (triton.cdiv(out_h * out_w, meta["BLOCK"]), n * c)

    wrap_triton(upfirdn2d_kernel)[grid](x, kernel, out, h, w, out_h, out_w, pad[0], pad[2],
                                        KH=kh, KW=kw, UP=up, DOWN=down)
    return out
