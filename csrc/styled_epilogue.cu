// styled_epilogue: leaky_relu(x·demod[b, c] + bias[c] + noise[b, 0, h, w]·strength), elementwise
// in memory order (NCHW or NHWC), the arithmetic in acc_type. Inference only: no gradient kernel.
#include "common.h"
#include "ops.h"
#include "styled_epilogue_index.h"

namespace mmfs_fast {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    styled_epilogue_kernel(const scalar_t* __restrict__ x, const float* __restrict__ demod,
                           const float* __restrict__ bias, const scalar_t* __restrict__ noise,
                           scalar_t* __restrict__ out, StyledEpilogueParams p) {
  using acc_t = acc_type<scalar_t>;
  const acc_t slope = p.slope, strength = p.noise_strength;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sample = i / (p.channels * p.pixels);
    const int64_t channel = p.channels_last ? i % p.channels : (i / p.pixels) % p.channels;
    const int64_t pixel = p.channels_last ? (i / p.channels) % p.pixels : i % p.pixels;
    acc_t z = acc_t(x[i]) * acc_t(demod[sample * p.channels + channel]) + acc_t(bias[channel]);
    if (p.has_noise) z += acc_t(noise[sample * p.noise_sample_stride + pixel]) * strength;
    out[i] = scalar_t(z > acc_t(0) ? z : z * slope);
  }
}

}  // namespace

Tensor styled_epilogue(const Tensor& x_in, const Tensor& demod, const Tensor& bias, const std::optional<Tensor>& noise,
                       double noise_strength, double slope) {
  const char* op = "mmfs_fast::styled_epilogue";
  check_cuda_float(x_in, op, "x");
  check_cuda_float(demod, op, "demod");
  check_cuda_float(bias, op, "bias");
  check_same_device(x_in, demod, op, "demod");
  check_same_device(x_in, bias, op, "bias");
  if (noise.has_value()) {
    check_cuda_float(*noise, op, "noise");
    check_same_device(x_in, *noise, op, "noise");
  }
  check_styled_epilogue_args(op, x_in.sizes(), demod.sizes(), bias.sizes(),
                             noise.has_value() ? std::optional<IntArray>(noise->sizes()) : std::nullopt);
  // The fake kernel in mmfs_fast/ops/_cuda.py makes the same choice: x walked as it is when
  // it can be, else a contiguous copy; the output has its strides.
  const Tensor x = walks_in_memory_order(x_in.sizes(), x_in.strides()) ? x_in : torch::stable::contiguous(x_in);
  Tensor out = torch::stable::empty_like(x);
  if (x.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const auto fp32 = torch::headeronly::ScalarType::Float;
  const Tensor demod32 = torch::stable::contiguous(torch::stable::to(demod, fp32));
  const Tensor bias32 = torch::stable::contiguous(torch::stable::to(bias, fp32));
  const Tensor noise_x =
      noise.has_value() ? torch::stable::contiguous(torch::stable::to(*noise, x.scalar_type())) : Tensor();
  const StyledEpilogueParams params =
      styled_epilogue_params(x.sizes(), x.strides(), noise.has_value() ? noise->size(0) : 0, noise_strength, slope);
  const cudaStream_t stream = current_stream(x);
  MMFS_FAST_DISPATCH_FLOATING(x.scalar_type(), "styled_epilogue", [&] {
    styled_epilogue_kernel<scalar_t><<<grid_stride_blocks(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), demod32.const_data_ptr<float>(), bias32.const_data_ptr<float>(),
        noise.has_value() ? noise_x.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), params);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mmfs_fast
