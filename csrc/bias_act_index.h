// bias_act's index math: the kernel's parameters, with the checks that need only sizes.
// bias_act.cu runs it on the GPU's host, tests/cuda_host_harness.cpp on the CPU.
#pragma once

#include "index_math.h"

#include <optional>

namespace mmfs_fast {

struct BiasActParams {
  int64_t numel;
  int64_t channel_stride;  // memory distance between consecutive channels (bias entries)
  int64_t channels;
  double slope, gain, clamp;
  bool has_bias, has_clamp;
};

inline void check_bias_act_args(const char* op, IntArray x, int64_t dim, std::optional<double> clamp) {
  const int64_t rank = int64_t(x.size());
  STD_TORCH_CHECK(rank >= 1, op, ": x must have at least one dimension");
  STD_TORCH_CHECK(dim >= 0 && dim < rank, op, ": dim ", dim, " is out of range for a ", rank, "-D tensor");
  STD_TORCH_CHECK(!clamp.has_value() || *clamp >= 0, op, ": clamp must be >= 0, got ", clamp.value_or(0));
}

// For x that the kernel walks in memory order (walks_in_memory_order): the bias entry of
// memory offset i is (i / channel_stride) % channels.
inline BiasActParams bias_act_params(IntArray sizes, IntArray strides, int64_t dim, bool has_bias, double slope,
                                     double gain, std::optional<double> clamp) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  return {numel, sizes[dim] > 1 ? strides[dim] : 1, sizes[dim], slope, gain, clamp.value_or(0), has_bias,
          clamp.has_value()};
}

}  // namespace mmfs_fast
