// styled_epilogue: (z > 0 ? z : slope·z)·next_styles[b, c] with
// z = blur(x)·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength, elementwise over the output in
// memory order (NCHW or NHWC), the arithmetic in acc_type; the activation before the
// ·next_styles also goes to unscaled_out when given. Inference only: no gradient kernel.
#include "common.h"
#include "ops.h"
#include "styled_epilogue_index.h"

namespace mmfs_fast {
namespace {

// The blur's output (oy, ox) of plane (sample, channel): a true convolution (the taps flipped, as
// upfirdn2d's) over x zero-padded by blur_pad on every side.
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> blurred(const scalar_t* __restrict__ x, const float* __restrict__ blur,
                                                      const StyledEpilogueParams& p, int64_t sample, int64_t channel,
                                                      int64_t oy, int64_t ox) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* plane = x + sample * p.x_stride.n + channel * p.x_stride.c;
  acc_t sum = acc_t(0);
  for (int64_t ky = 0; ky < p.blur_h; ++ky) {
    const int64_t iy = oy + ky - p.blur_pad;
    if (iy < 0 || iy >= p.in_h) continue;
    for (int64_t kx = 0; kx < p.blur_w; ++kx) {
      const int64_t ix = ox + kx - p.blur_pad;
      if (ix < 0 || ix >= p.in_w) continue;
      sum += acc_t(blur[(p.blur_h - 1 - ky) * p.blur_w + (p.blur_w - 1 - kx)]) *
             acc_t(plane[iy * p.x_stride.y + ix * p.x_stride.x]);
    }
  }
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    styled_epilogue_kernel(const scalar_t* __restrict__ x, const float* __restrict__ demod,
                           const float* __restrict__ bias, const scalar_t* __restrict__ noise,
                           const float* __restrict__ next_styles, const float* __restrict__ blur,
                           scalar_t* __restrict__ out, scalar_t* __restrict__ unscaled, StyledEpilogueParams p) {
  using acc_t = acc_type<scalar_t>;
  const acc_t slope = p.slope, strength = p.noise_strength;
  const int64_t pixels = p.out_h * p.out_w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sample = i / (p.channels * pixels);
    const int64_t channel = p.channels_last ? i % p.channels : (i / pixels) % p.channels;
    const int64_t pixel = p.channels_last ? (i / p.channels) % pixels : i % pixels;
    const int64_t styled = sample * p.channels + channel;
    // without a blur, x is walked in the output's memory order
    const acc_t value = p.blur_h > 0 ? blurred(x, blur, p, sample, channel, pixel / p.out_w, pixel % p.out_w)
                                     : acc_t(x[i]);
    acc_t z = value * acc_t(demod[styled]) + acc_t(bias[channel]);
    if (p.has_noise) z += acc_t(noise[sample * p.noise_sample_stride + pixel]) * strength;
    z = z > acc_t(0) ? z : z * slope;
    if (unscaled != nullptr) unscaled[i] = scalar_t(z);  // dense in the output's layout: the same offset
    if (p.has_next_styles) z *= acc_t(next_styles[styled]);
    out[i] = scalar_t(z);
  }
}

// The host function's optional inputs.
std::optional<IntArray> sizes_of(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<IntArray>(t->sizes()) : std::nullopt;
}

// An optional input as a contiguous tensor of the given dtype (an undefined one when absent).
Tensor contiguous_as(const std::optional<Tensor>& t, ScalarType dtype) {
  return t.has_value() ? torch::stable::contiguous(torch::stable::to(*t, dtype)) : Tensor();
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& given, const Tensor& converted) {
  return given.has_value() ? converted.const_data_ptr<T>() : nullptr;
}

}  // namespace

Tensor styled_epilogue(const Tensor& x_in, const Tensor& demod, const Tensor& bias, const std::optional<Tensor>& noise,
                       double noise_strength, double slope, const std::optional<Tensor>& next_styles,
                       const std::optional<Tensor>& blur, int64_t blur_pad,
                       const std::optional<Tensor>& unscaled_out) {
  const char* op = "mmfs_fast::styled_epilogue";
  check_cuda_float(x_in, op, "x");
  check_cuda_float(demod, op, "demod");
  check_cuda_float(bias, op, "bias");
  check_same_device(x_in, demod, op, "demod");
  check_same_device(x_in, bias, op, "bias");
  const auto check_optional = [&](const std::optional<Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    check_cuda_float(*t, op, name);
    check_same_device(x_in, *t, op, name);
  };
  check_optional(noise, "noise");
  check_optional(next_styles, "next_styles");
  check_optional(blur, "blur");
  check_optional(unscaled_out, "unscaled_out");
  const StyledEpilogueSize size = styled_epilogue_output_size(op, x_in.sizes(), demod.sizes(), bias.sizes(),
                                                              sizes_of(noise), sizes_of(next_styles), sizes_of(blur),
                                                              blur_pad);
  // The fake kernel in mmfs_fast/ops/_cuda.py makes the same choices: x walked as it is when it
  // can be, else a contiguous copy; the output in its layout.
  const Tensor x = walks_in_memory_order(x_in.sizes(), x_in.strides()) ? x_in : torch::stable::contiguous(x_in);
  const int64_t out_shape[] = {x.size(0), x.size(1), size.h, size.w};
  Tensor out = empty_with_layout_of(x, out_shape);
  if (unscaled_out.has_value()) {
    check_unscaled_out(op, next_styles.has_value(), unscaled_out->sizes(), unscaled_out->strides(), out.sizes(),
                       output_is_channels_last(x.sizes(), x.strides()));
    STD_TORCH_CHECK(unscaled_out->scalar_type() == x.scalar_type(), op, ": unscaled_out must have x's dtype ",
                    x.scalar_type(), ", got ", unscaled_out->scalar_type());
  }
  if (out.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor demod32 = torch::stable::contiguous(torch::stable::to(demod, ScalarType::Float));
  const Tensor bias32 = torch::stable::contiguous(torch::stable::to(bias, ScalarType::Float));
  const Tensor noise_x = contiguous_as(noise, x.scalar_type());
  const Tensor next32 = contiguous_as(next_styles, ScalarType::Float);
  const Tensor blur32 = contiguous_as(blur, ScalarType::Float);
  const StyledEpilogueParams params =
      styled_epilogue_params(x.sizes(), x.strides(), size, noise.has_value() ? noise->size(0) : 0,
                             next_styles.has_value(), sizes_of(blur), blur_pad, noise_strength, slope);
  const cudaStream_t stream = current_stream(x);
  MMFS_FAST_DISPATCH_FLOATING(x.scalar_type(), "styled_epilogue", [&] {
    styled_epilogue_kernel<scalar_t><<<grid_stride_blocks(out.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), demod32.const_data_ptr<float>(), bias32.const_data_ptr<float>(),
        data_or_null<scalar_t>(noise, noise_x), data_or_null<float>(next_styles, next32),
        data_or_null<float>(blur, blur32), out.mutable_data_ptr<scalar_t>(),
        unscaled_out.has_value() ? unscaled_out->mutable_data_ptr<scalar_t>() : nullptr, params);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mmfs_fast
