// The pure integer math of the kernels' host code: grid sizes, layout rules, argument checks.
// It uses nothing of CUDA or of torch but header-only headers, so tests/cuda_host_harness.cpp
// compiles this same code with g++ and tests/test_cuda_index_math.py checks it on the CPU.
#pragma once

#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

// Marks the helpers that both the kernels and the host code call.
#ifdef __CUDACC__
#define MMFS_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMFS_FAST_HOST_DEVICE inline
#endif

namespace mmfs_fast {

using IntArray = torch::headeronly::IntHeaderOnlyArrayRef;

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int64_t kMaxGridYZ = 65535;  // gridDim.y's and gridDim.z's limit

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `work` items; more would only queue up.
inline unsigned grid_stride_blocks(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, int64_t(1) << 20));
}

// Element strides of an (N, C, H, W) tensor, so that kernels read any layout in place.
struct Strides4 {
  int64_t n, c, y, x;
};

inline Strides4 strides4(IntArray strides) { return {strides[0], strides[1], strides[2], strides[3]}; }

// "[2, 3, 8, 8]", for error messages.
inline std::string format_ints(IntArray values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

// Whether the strides are those of a dense tensor whose dims, innermost first, are `order`;
// sizes of 1 are ignored, as torch's is_contiguous does.
inline bool is_dense_in_order(IntArray sizes, IntArray strides, IntArray order) {
  int64_t expected = 1;
  for (const int64_t d : order) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// torch's is_contiguous() (the default layout): dense with the last dim innermost, or empty.
inline bool is_contiguous(IntArray sizes, IntArray strides) {
  if (std::find(sizes.begin(), sizes.end(), int64_t(0)) != sizes.end()) return true;
  std::vector<int64_t> order(sizes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(order.size() - 1 - i);
  return is_dense_in_order(sizes, strides, order);
}

// torch's is_contiguous(memory_format=channels_last) for 4-D tensors: strides grow over c, x, y, n.
inline bool is_channels_last(IntArray sizes, IntArray strides) {
  constexpr int64_t order[] = {1, 3, 2, 0};
  return sizes.size() == 4 && is_dense_in_order(sizes, strides, order);
}

// Outputs are channels_last exactly when the input is channels_last and not also contiguous;
// the fake kernels in mmfs_fast/ops/_cuda.py apply the same rule.
inline bool output_is_channels_last(IntArray sizes, IntArray strides) {
  return is_channels_last(sizes, strides) && !is_contiguous(sizes, strides);
}

// Whether an elementwise kernel can walk the tensor in memory order as it is.
inline bool walks_in_memory_order(IntArray sizes, IntArray strides) {
  return is_contiguous(sizes, strides) || is_channels_last(sizes, strides);
}

inline bool same_strides(IntArray a, IntArray b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace mmfs_fast
