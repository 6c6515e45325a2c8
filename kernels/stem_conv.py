"""stem_conv in Triton: one program per BLOCK_P output pixels of one sample and BLOCK_O output
channels. It gathers the pixels' C·k·k input taps (their im2col rows, padded with zeros to a
power of two of at least 16, the smallest tensor-core product) straight from x, whatever its
layout, multiplies them by the (C·k·k, O) weight (gathered the same way) on tensor cores with fp32 accumulation, adds
the bias, applies the leaky ReLU and writes the output once: with three input channels the
product is small and the output's one write is the kernel's cost."""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK_P = 128  # output pixels per program (a row segment or several rows)
MAX_BLOCK_O = 64  # output channels per program: the encoder's stem has 64


@triton.jit
def stem_conv_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, height, width, taps, out_ch,
                     sx_b, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w, so_b, so_c, so_h, so_w, alpha,
                     KSIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    sample = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = pixels < height * width
    row, col = pixels // width, pixels % width
    # tap t of an output pixel: channel t // k², offset ((t // k) % k, t % k) in its window
    t = tl.arange(0, BLOCK_T)
    channel, dy, dx = t // (KSIZE * KSIZE), (t // KSIZE) % KSIZE, t % KSIZE
    iy = row[:, None] + dy[None, :] - KSIZE // 2
    ix = col[:, None] + dx[None, :] - KSIZE // 2
    inside = (in_image[:, None] & (t < taps)[None, :] & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width))
    patches = tl.load(x_ptr + sample * sx_b + channel[None, :] * sx_c + iy * sx_h + ix * sx_w, mask=inside, other=0.0)
    outs = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    weight = tl.load(weight_ptr + outs[None, :] * sw_o + (channel * sw_c + dy * sw_h + dx * sw_w)[:, None],
                     mask=(t < taps)[:, None] & (outs < out_ch)[None, :], other=0.0)
    acc = tl.dot(patches, weight, input_precision="ieee")
    acc += tl.load(bias_ptr + outs, mask=outs < out_ch, other=0.0)[None, :]
    acc = tl.where(acc >= 0, acc, acc * alpha)
    tl.store(out_ptr + sample * so_b + outs[None, :] * so_c + row[:, None] * so_h + col[:, None] * so_w,
             acc.to(out_ptr.dtype.element_ty), mask=in_image[:, None] & (outs < out_ch)[None, :])


def stem_conv(x, weight, bias, alpha, memory_format):
    """x (B, C, H, W) and weight (O, C, k, k) in x's dtype, any strides (the Engine keeps both
    channels-last); bias (O,) fp32 contiguous. leaky_relu(conv2d(x, weight, padding=k // 2) + bias) in x's dtype and
    ``memory_format``."""
    batch, in_ch, height, width = x.shape
    out_ch, _, ksize, _ = weight.shape
    out = torch.empty((batch, out_ch, height, width), dtype=x.dtype, device=x.device, memory_format=memory_format)
    taps = in_ch * ksize * ksize
    block_o = min(MAX_BLOCK_O, max(16, triton.next_power_of_2(out_ch)))
    grid = (triton.cdiv(height * width, BLOCK_P), batch, triton.cdiv(out_ch, block_o))
    wrap_triton(stem_conv_kernel)[grid](
        x, weight, bias, out, height, width, taps, out_ch, *x.stride(), *weight.stride(), *out.stride(), alpha,
        KSIZE=ksize, BLOCK_T=max(16, triton.next_power_of_2(taps)), BLOCK_P=BLOCK_P, BLOCK_O=block_o, num_warps=4)
    return out
