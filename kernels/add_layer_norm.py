"""add_layer_norm in Triton: one program per row of D values (a token), which it reads once:
the sum x + residual is written, then normalised from registers, with the row's mean and
1/std kept for the backward."""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def add_layer_norm_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, sum_ptr, normed_ptr, mean_ptr, rstd_ptr,
                          width, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    offs = row.to(tl.int64) * width + cols
    total = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(sum_ptr + offs, total.to(sum_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(total, axis=0) / width
    centred = tl.where(mask, total - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + cols, mask=mask).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=mask).to(tl.float32)
    tl.store(normed_ptr + offs, y.to(normed_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def add_layer_norm(x, residual, weight, bias, eps):
    """x, residual (..., D) contiguous, any float dtype; weight, bias None or (D,) contiguous.
    (sum, normed) in x's dtype and x's shape, and the fp32 mean and 1/std of each row, (rows,)."""
    width = x.shape[-1]
    rows = x.numel() // width
    total, normed = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    # the whole row in one block: D is a transformer's width (512 for CLIP's text tower and the
    # mapper, 768 for its image tower)
    block = triton.next_power_of_2(width)
    wrap_triton(add_layer_norm_kernel)[(rows,)](
        x, residual, weight, bias, total, normed, mean, rstd, width, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=min(8, max(1, block // 256)))
    return total, normed, mean, rstd
