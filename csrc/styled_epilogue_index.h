// styled_epilogue's index math: the kernel's parameters, with the checks that need only sizes.
// styled_epilogue.cu runs it on the GPU's host, tests/cuda_host_harness.cpp on the CPU.
#pragma once

#include "index_math.h"

#include <optional>

namespace mmfs_fast {

struct StyledEpilogueParams {
  int64_t numel;
  int64_t channels, pixels;  // C and H·W of x
  int64_t noise_sample_stride;  // 0 when one noise plane is shared by the batch
  double noise_strength, slope;
  bool channels_last;  // x walked in NHWC order, else NCHW
  bool has_noise;
};

inline void check_styled_epilogue_args(const char* op, IntArray x, IntArray demod, IntArray bias,
                                       std::optional<IntArray> noise) {
  STD_TORCH_CHECK(x.size() == 4, op, ": x must be 4-D (B, C, H, W), got ", format_ints(x));
  STD_TORCH_CHECK(demod.size() == 2 && demod[0] == x[0] && demod[1] == x[1], op, ": demod must have shape (", x[0],
                  ", ", x[1], "), got ", format_ints(demod));
  STD_TORCH_CHECK(bias.size() == 1 && bias[0] == x[1], op, ": bias must have shape (", x[1], "), got ",
                  format_ints(bias));
  if (noise.has_value()) {
    const IntArray n = *noise;
    STD_TORCH_CHECK(n.size() == 4 && (n[0] == 1 || n[0] == x[0]) && n[1] == 1 && n[2] == x[2] && n[3] == x[3], op,
                    ": noise must have shape (1 or ", x[0], ", 1, ", x[2], ", ", x[3], "), got ", format_ints(n));
  }
}

// For x that the kernel walks in memory order (walks_in_memory_order) and a contiguous noise
// of noise_batch planes (0: none): memory offset i is sample i / (C·H·W), and channel and
// pixel follow from the layout.
inline StyledEpilogueParams styled_epilogue_params(IntArray sizes, IntArray strides, int64_t noise_batch,
                                                   double noise_strength, double slope) {
  const int64_t pixels = sizes[2] * sizes[3];
  return {sizes[0] * sizes[1] * pixels, sizes[1], pixels, noise_batch > 1 ? pixels : 0, noise_strength, slope,
          !is_contiguous(sizes, strides), noise_batch > 0};
}

}  // namespace mmfs_fast
