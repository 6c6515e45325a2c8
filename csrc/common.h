// Helpers shared by the kernels' host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace mmfs_fast {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `work` items; more would only queue up.
inline unsigned grid_stride_blocks(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, int64_t(1) << 20));
}

// Element strides of an (N, C, H, W) tensor, so that kernels read any layout in place.
struct Strides4 {
  int64_t n, c, y, x;
};

inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Outputs are channels_last exactly when the input is channels_last and not also
// contiguous; the fake kernels in mmfs_fast/ops/_cuda.py apply the same rule.
inline at::Tensor empty_with_layout_of(const at::Tensor& x, at::IntArrayRef shape) {
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return at::empty(shape, x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous));
}

inline void check_cuda_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but x is on ", a.device());
}

}  // namespace mmfs_fast
