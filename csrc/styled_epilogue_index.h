// styled_epilogue's index math: the kernel's parameters, with the output size and the checks
// that need only sizes. styled_epilogue.cu runs it on the GPU's host, tests/cuda_host_harness.cpp
// on the CPU.
#pragma once

#include "index_math.h"

#include <optional>

namespace mmfs_fast {

struct StyledEpilogueParams {
  int64_t numel;  // of the output
  int64_t channels, out_h, out_w;
  int64_t in_h, in_w;
  Strides4 x_stride;  // read through by the blur; without one, x is walked in the output's memory order
  int64_t noise_sample_stride;  // 0 when one noise plane is shared by the batch
  int64_t blur_h, blur_w, blur_pad;  // blur_h == 0: no blur
  double noise_strength, slope;
  bool channels_last;  // the output walked in NHWC order, else NCHW
  bool has_noise, has_next_styles;
};

struct StyledEpilogueSize {
  int64_t h, w;
};

// The output's height and width (x's, or the blur's output), after the checks of x (B, C, H, W),
// demod (B, C), bias (C), noise (1 or B, 1, H', W'), next_styles (B, C), blur (kh, kw) and its pad
// that need only sizes.
inline StyledEpilogueSize styled_epilogue_output_size(const char* op, IntArray x, IntArray demod, IntArray bias,
                                                      std::optional<IntArray> noise,
                                                      std::optional<IntArray> next_styles,
                                                      std::optional<IntArray> blur, int64_t blur_pad) {
  STD_TORCH_CHECK(x.size() == 4, op, ": x must be 4-D (B, C, H, W), got ", format_ints(x));
  STD_TORCH_CHECK(demod.size() == 2 && demod[0] == x[0] && demod[1] == x[1], op, ": demod must have shape (", x[0],
                  ", ", x[1], "), got ", format_ints(demod));
  STD_TORCH_CHECK(bias.size() == 1 && bias[0] == x[1], op, ": bias must have shape (", x[1], "), got ",
                  format_ints(bias));
  if (next_styles.has_value()) {
    const IntArray s = *next_styles;
    STD_TORCH_CHECK(s.size() == 2 && s[0] == x[0] && s[1] == x[1], op, ": next_styles must have shape (", x[0], ", ",
                    x[1], "), got ", format_ints(s));
  }
  StyledEpilogueSize size{x[2], x[3]};
  if (blur.has_value()) {
    const IntArray k = *blur;
    STD_TORCH_CHECK(k.size() == 2 && k[0] >= 1 && k[1] >= 1, op, ": blur must be a 2-D FIR (kh, kw), got ",
                    format_ints(k));
    // the bound keeps the padded size far from int64's limit
    STD_TORCH_CHECK(blur_pad >= 0 && blur_pad < (int64_t(1) << 24), op, ": blur_pad must be in [0, 2^24), got ",
                    blur_pad);
    size = {x[2] + 2 * blur_pad - k[0] + 1, x[3] + 2 * blur_pad - k[1] + 1};
    STD_TORCH_CHECK(size.h >= 1 && size.w >= 1, op, ": a ", format_ints(k), " blur with pad ", blur_pad,
                    " leaves nothing of x's [", x[2], ", ", x[3], "]");
  } else {
    STD_TORCH_CHECK(blur_pad == 0, op, ": blur_pad is given (", blur_pad, ") without a blur");
  }
  if (noise.has_value()) {
    const IntArray n = *noise;
    STD_TORCH_CHECK(n.size() == 4 && (n[0] == 1 || n[0] == x[0]) && n[1] == 1 && n[2] == size.h && n[3] == size.w,
                    op, ": noise must have shape (1 or ", x[0], ", 1, ", size.h, ", ", size.w, "), got ",
                    format_ints(n));
  }
  return size;
}

// unscaled_out, which the kernel writes at the output's offsets: given only with next_styles (it
// would equal the output), of the output's sizes and dense in its layout (the strides of dims of
// size 1 are free, as for torch's is_contiguous, and offset nothing).
inline void check_unscaled_out(const char* op, bool has_next_styles, IntArray sizes, IntArray strides,
                               IntArray out_sizes, bool out_channels_last) {
  STD_TORCH_CHECK(has_next_styles, op, ": unscaled_out is given without next_styles (it would equal the result)");
  STD_TORCH_CHECK(sizes.size() == out_sizes.size() && std::equal(sizes.begin(), sizes.end(), out_sizes.begin()), op,
                  ": unscaled_out must have the result's shape ", format_ints(out_sizes), ", got ", format_ints(sizes));
  const bool dense = out_channels_last ? is_channels_last(sizes, strides) : is_contiguous(sizes, strides);
  STD_TORCH_CHECK(dense, op, ": unscaled_out must be dense in the result's layout (",
                  out_channels_last ? "channels_last" : "contiguous", "), got strides ", format_ints(strides));
}

// After styled_epilogue_output_size's checks, for x that the kernel walks in memory order
// (walks_in_memory_order), an output of x's layout (empty_with_layout_of), a contiguous noise
// of noise_batch planes (0: none) and blur (kh, kw) or none: output offset i is sample
// i / (C·H'·W'), and channel and pixel follow from the layout.
inline StyledEpilogueParams styled_epilogue_params(IntArray sizes, IntArray strides, StyledEpilogueSize out,
                                                   int64_t noise_batch, bool has_next_styles,
                                                   std::optional<IntArray> blur, int64_t blur_pad,
                                                   double noise_strength, double slope) {
  return {sizes[0] * sizes[1] * out.h * out.w,
          sizes[1],
          out.h,
          out.w,
          sizes[2],
          sizes[3],
          strides4(strides),
          noise_batch > 1 ? out.h * out.w : 0,
          blur.has_value() ? (*blur)[0] : 0,
          blur.has_value() ? (*blur)[1] : 0,
          blur_pad,
          noise_strength,
          slope,
          output_is_channels_last(sizes, strides),
          noise_batch > 0,
          has_next_styles};
}

}  // namespace mmfs_fast
