// Modulated convolution: out[b, o] = demod[b, o] * conv(x[b] * styles[b], W)[o].
// Scaling the input channels by the styles instead of the weights keeps one shared weight, so
// the convolution is one cuDNN call for the whole batch (implicit GEMM on tensor cores, fp32
// accumulation) and no (B, O, I, k, k) weight tensor is built. The kernels here are the
// modulation before it and the demodulation after it, each one pass in fp32 with a single
// rounding to the storage dtype.
// Why cuDNN and not a kernel of ours: a fused implicit GEMM lost to it (bench/results/).
// torch::stable has no convolution op: convolution() below calls aten::convolution through the
// stable shim's dispatcher entry point (torch_call_dispatcher), as torch/csrc/stable/ops.h does
// for the ops it wraps, so the convolution is still cuDNN's and the ABI still the stable one.
#include "common.h"
#include "modulated_conv2d_index.h"
#include "ops.h"

#include <array>

namespace mmfs_fast {
namespace {

constexpr float kDemodEps = 1e-8f;  // DEMOD_EPS of mmfs_fast/ops/_common.py

// demod[b, o] = rsqrt(sum_{i, t} (W[o, i, t] * styles[b, i])^2 + eps), one warp per (b, o):
// mirrors mmfs_fast.ops._common.demodulation.
__global__ void __launch_bounds__(kThreads)
    demod_kernel(const float* __restrict__ weight, const float* __restrict__ styles, float* __restrict__ demod,
                 int batch, int out_channels, int in_channels, int taps) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= int64_t(batch) * out_channels) return;  // whole warps leave together: the shuffles below stay full
  const int b = warp / out_channels, o = warp % out_channels, reduction = in_channels * taps;
  float sum = 0.f;
  for (int r = lane; r < reduction; r += kWarp) {
    const float w = weight[int64_t(o) * reduction + r] * styles[int64_t(b) * in_channels + r / taps];
    sum += w * w;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) demod[warp] = rsqrtf(sum + kDemodEps);
}

// dst[n, c, y, x] = src[n, c, y, x] * scale[n, c] (scale may be null: a layout copy), walking
// dst in memory order so its writes coalesce; src may have any strides.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_channels_kernel(const scalar_t* __restrict__ src, const float* __restrict__ scale,
                          scalar_t* __restrict__ dst, ScaleParams p) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = i;
    int c, y, x;
    if (p.channels_last) {
      c = rest % p.channels, rest /= p.channels;
      x = rest % p.width, rest /= p.width;
      y = rest % p.height, rest /= p.height;
    } else {
      x = rest % p.width, rest /= p.width;
      y = rest % p.height, rest /= p.height;
      c = rest % p.channels, rest /= p.channels;
    }
    const int64_t n = rest;
    acc_t value = src[n * p.src_stride.n + c * p.src_stride.c + y * p.src_stride.y + x * p.src_stride.x];
    if (scale != nullptr) value *= scale[n * p.channels + c];
    dst[i] = scalar_t(value);
  }
}

// dst (dense, from empty_with_layout_of) = src · scale[n, c], or a copy into dst's layout when
// scale is undefined.
void scale_channels(const Tensor& src, const Tensor& scale, const Tensor& dst) {
  if (dst.numel() == 0) return;
  const ScaleParams params = scale_params(src.strides(), dst.sizes(), dst.strides());
  const cudaStream_t stream = current_stream(dst);
  const auto launch = [&](auto scalar) {
    using scalar_t = decltype(scalar);
    scale_channels_kernel<scalar_t><<<grid_stride_blocks(dst.numel()), kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), scale.defined() ? scale.const_data_ptr<float>() : nullptr,
        dst.mutable_data_ptr<scalar_t>(), params);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  };
  THO_DISPATCH_SWITCH(dst.scalar_type(), "scale_channels",
                      THO_DISPATCH_CASE(ScalarType::Float, [&] { launch(scalar_t{}); })
                      THO_DISPATCH_CASE(ScalarType::Half, [&] { launch(scalar_t{}); })
                      THO_DISPATCH_CASE(ScalarType::BFloat16, [&] { launch(scalar_t{}); }));
}

// aten::convolution(input, weight, bias=None, stride, padding, dilation=1, transposed,
// output_padding=0, groups=1) through the dispatcher.
Tensor convolution(const Tensor& input, const Tensor& weight, int64_t stride, int64_t padding, bool transposed) {
  using torch::headeronly::IntHeaderOnlyArrayRef;
  using torch::stable::detail::from;
  const int64_t strides[] = {stride, stride}, paddings[] = {padding, padding}, ones[] = {1, 1}, zeros[] = {0, 0};
  std::array<StableIValue, 9> stack{from(input),
                                    from(weight),
                                    from(std::nullopt),
                                    from(IntHeaderOnlyArrayRef(strides)),
                                    from(IntHeaderOnlyArrayRef(paddings)),
                                    from(IntHeaderOnlyArrayRef(ones)),
                                    from(transposed),
                                    from(IntHeaderOnlyArrayRef(zeros)),
                                    from(int64_t(1))};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::convolution", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace

Tensor modulated_conv2d(const Tensor& x, const Tensor& weight, const Tensor& styles, bool demodulate,
                        bool transposed, int64_t stride, int64_t padding) {
  constexpr const char* op = "mmfs_fast::modulated_conv2d";
  check_cuda_float(x, op, "x");
  check_cuda_float(weight, op, "weight");
  check_cuda_float(styles, op, "styles");
  check_same_device(x, weight, op, "weight");
  check_same_device(x, styles, op, "styles");
  STD_TORCH_CHECK(x.scalar_type() != ScalarType::Double, op, ": x must be float32, float16 or bfloat16, got float64");
  const ModulatedConv2dSize size =
      modulated_conv2d_output_size(x.sizes(), weight.sizes(), styles.sizes(), transposed, stride, padding);
  const int64_t batch = x.size(0), in_channels = x.size(1), out_channels = weight.size(0), k = weight.size(2);

  const int64_t out_shape[] = {batch, out_channels, size.h, size.w};
  Tensor out = empty_with_layout_of(x, out_shape);
  if (out.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor styles_f = torch::stable::contiguous(torch::stable::to(styles, ScalarType::Float));
  Tensor modulated = empty_with_layout_of(x, x.sizes());
  scale_channels(x, styles_f, modulated);
  // a transposed convolution takes its weight as (in, out, k, k)
  const Tensor weight_x = torch::stable::to(weight, x.scalar_type());
  const Tensor conv = convolution(modulated, transposed ? torch::stable::transpose(weight_x, 0, 1) : weight_x, stride,
                                  padding, transposed);
  if (!demodulate) {
    if (same_strides(conv.strides(), out.strides())) return conv;
    scale_channels(conv, Tensor(), out);
    return out;
  }
  // Weights and styles are small: fp32 copies keep the products exact before the sum of squares.
  const Tensor weight_f = torch::stable::contiguous(torch::stable::to(weight, ScalarType::Float));
  const int64_t demod_shape[] = {batch, out_channels};
  Tensor demod = torch::stable::empty(demod_shape, ScalarType::Float, std::nullopt, x.device());
  demod_kernel<<<demod_blocks(batch, out_channels), kThreads, 0, current_stream(x)>>>(
      weight_f.const_data_ptr<float>(), styles_f.const_data_ptr<float>(), demod.mutable_data_ptr<float>(),
      int(batch), int(out_channels), int(in_channels), int(k * k));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  scale_channels(conv, demod, out);
  return out;
}

}  // namespace mmfs_fast
