"""linear_silu in Triton: a tiled GEMM, one program per BLOCK_M rows × BLOCK_N outputs, the
width in BLOCK_K steps on tensor cores with fp32 accumulation, whose epilogue scales, adds the
bias and applies SiLU before the one write: the separate SiLU pass, and its launch, go."""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from mmfs_fast.kernels._config import autotune_configs

# The style path's shapes: 10 to 2464 rows (the mapper's tokens at batch 1, CLIP's text tower
# at batch 32), 512 or 768 wide, 2048 or 3072 outputs. BLOCK_M 16 keeps a batch-1 call (50–77
# rows) spread over ~100 programs; the larger tiles are for the large batches.
_CONFIGS = autotune_configs(
    full=[{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
          for m, n, k, w, s in ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                                (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3))],
    interpreted={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})


@triton.autotune(configs=_CONFIGS, key=["rows", "outs", "width", "IEEE"])
@triton.jit
def linear_silu_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, rows, outs, width, sx_m, sx_k, sw_n, sw_k,
                       so_m, so_n, alpha, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in, n_in = m < rows, n < outs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, width, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_in = k < width
        a = tl.load(x_ptr + m[:, None].to(tl.int64) * sx_m + k[None, :] * sx_k,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(weight_ptr + n[None, :].to(tl.int64) * sw_n + k[:, None] * sw_k,
                    mask=k_in[:, None] & n_in[None, :], other=0.0)
        # fp32 inputs (the fine-tuning's CLIP) as ATen's fp32 matmul: no TF32
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else "tf32")
    pre = acc * alpha + tl.load(bias_ptr + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y = pre * tl.sigmoid(pre)
    tl.store(out_ptr + m[:, None].to(tl.int64) * so_m + n[None, :] * so_n, y.to(out_ptr.dtype.element_ty),
             mask=m_in[:, None] & n_in[None, :])


def linear_silu(x, weight, bias, alpha):
    """x (M, K), weight (N, K) in x's dtype, any strides; bias (N,) contiguous, any float dtype.
    silu(alpha · x @ weightᵀ + bias), (M, N) contiguous in x's dtype."""
    rows, width = x.shape
    outs = weight.shape[0]
    out = torch.empty((rows, outs), dtype=x.dtype, device=x.device)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(outs, meta["BLOCK_N"])

    wrap_triton(linear_silu_kernel)[grid](x, weight, bias, out, rows, outs, width, *x.stride(), *weight.stride(),
                                          *out.stride(), alpha, IEEE=x.dtype == torch.float32)
    return out
