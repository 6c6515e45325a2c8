// modulated_conv2d's index math: the output size with the checks that need only sizes, the
// parameters of the channel-scaling kernel and the demodulation kernel's grid.
// modulated_conv2d.cu runs it on the GPU's host, tests/cuda_host_harness.cpp on the CPU.
#pragma once

#include "index_math.h"

namespace mmfs_fast {

struct ModulatedConv2dSize {
  int64_t h, w;
};

// The output's height and width, after the checks of x (B, I, H, W), weight (O, I, k, k),
// styles (B, I), stride and padding.
inline ModulatedConv2dSize modulated_conv2d_output_size(IntArray x, IntArray weight, IntArray styles,
                                                        bool transposed, int64_t stride, int64_t padding) {
  constexpr const char* op = "mmfs_fast::modulated_conv2d";
  STD_TORCH_CHECK(x.size() == 4 && weight.size() == 4 && styles.size() == 2, op,
                  ": expected x (B, I, H, W), weight (O, I, k, k) and styles (B, I), got ", format_ints(x), ", ",
                  format_ints(weight), ", ", format_ints(styles));
  const int64_t batch = x[0], in_channels = x[1], out_channels = weight[0], k = weight[2];
  STD_TORCH_CHECK(weight[1] == in_channels && weight[3] == k && k >= 1, op, ": weight ", format_ints(weight),
                  " must be (O, ", in_channels, ", k, k)");
  STD_TORCH_CHECK(styles[0] == batch && styles[1] == in_channels, op, ": styles must be (", batch, ", ",
                  in_channels, "), got ", format_ints(styles));
  STD_TORCH_CHECK(in_channels >= 1 && out_channels >= 1 && x[2] >= 1 && x[3] >= 1, op,
                  ": x and weight must have channels and pixels, got x ", format_ints(x), " and weight ",
                  format_ints(weight));
  STD_TORCH_CHECK(stride >= 1 && padding >= 0, op, ": stride must be >= 1 and padding >= 0, got ", stride, " and ",
                  padding);
  // the kernels index channels and pixels with int, samples and elements with int64
  STD_TORCH_CHECK(std::max({in_channels, out_channels, x[2], x[3]}) < (int64_t(1) << 31) &&
                      out_channels * in_channels * k * k < (int64_t(1) << 31),
                  op, ": sizes out of range: x ", format_ints(x), ", weight ", format_ints(weight));
  const auto out_size = [&](int64_t in) {
    return transposed ? (in - 1) * stride - 2 * padding + k : (in + 2 * padding - k) / stride + 1;
  };
  const int64_t out_h = out_size(x[2]), out_w = out_size(x[3]);
  STD_TORCH_CHECK(out_h >= 1 && out_w >= 1 && (transposed || x[2] + 2 * padding >= k) &&
                      (transposed || x[3] + 2 * padding >= k),
                  op, ": input ", format_ints(x), " with kernel ", k, ", stride ", stride, ", padding ", padding,
                  " leaves an empty output");
  STD_TORCH_CHECK(out_h < (int64_t(1) << 31) && out_w < (int64_t(1) << 31), op, ": output of ", out_h, "x", out_w,
                  " is too large");
  return {out_h, out_w};
}

struct ScaleParams {
  Strides4 src_stride;
  int64_t numel;
  int channels, height, width;
  bool channels_last;  // the layout dst is dense in, and so the order it is walked in
};

// dst is dense in one layout (it comes from empty_with_layout_of); src may have any strides.
inline ScaleParams scale_params(IntArray src_strides, IntArray dst, IntArray dst_strides) {
  return {strides4(src_strides), dst[0] * dst[1] * dst[2] * dst[3], int(dst[1]), int(dst[2]), int(dst[3]),
          !is_contiguous(dst, dst_strides)};
}

// One warp per (sample, output channel).
inline unsigned demod_blocks(int64_t batch, int64_t out_channels) {
  return unsigned(ceil_div(batch * out_channels * kWarp, kThreads));
}

}  // namespace mmfs_fast
