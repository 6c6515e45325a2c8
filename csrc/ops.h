// Host entry points of the CUDA kernels, registered as torch.ops.mmfs_fast.* in bindings.cpp.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <optional>

namespace mmfs_fast {

using torch::stable::Tensor;

// Upsample by zero insertion, pad (x0, x1, y0, y1; negative crops), correlate with the
// flipped FIR kernel (so: true convolution), keep every down-th sample.
Tensor upfirdn2d(const Tensor& x, const Tensor& kernel, int64_t up, int64_t down,
                 torch::headeronly::IntHeaderOnlyArrayRef pad);

// clamp((z > 0 ? z : slope * z) * gain) with z = x + bias along dim.
Tensor bias_act(const Tensor& x, const std::optional<Tensor>& bias, double slope, double gain,
                std::optional<double> clamp, int64_t dim);

// The gradient of bias_act with respect to x, given the gradient of its output.
Tensor bias_act_grad(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& bias, double slope,
                     double gain, std::optional<double> clamp, int64_t dim);

// (z > 0 ? z : slope * z) * next_styles[b, c] with
// z = blur(x) * demod[b, c] + bias[c] + noise[b or 0, 0, h, w] * noise_strength, in acc_type; blur
// is upfirdn2d(x, blur, pad = blur_pad on every side), so noise has the blurred size; demod (B, C),
// bias (C,), next_styles (B, C) and the blur's taps are read in fp32. unscaled_out (only with next_styles:
// the result's shape, x's dtype, dense in the result's layout) receives z before the * next_styles.
// Inference only: no gradient kernel.
Tensor styled_epilogue(const Tensor& x, const Tensor& demod, const Tensor& bias, const std::optional<Tensor>& noise,
                       double noise_strength, double slope, const std::optional<Tensor>& next_styles,
                       const std::optional<Tensor>& blur, int64_t blur_pad, const std::optional<Tensor>& unscaled_out);

}  // namespace mmfs_fast
