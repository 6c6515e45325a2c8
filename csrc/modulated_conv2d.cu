// Modulated convolution: out[b, o] = demod[b, o] * sum_{i, ky, kx} W[o, i, ky, kx] * styles[b, i] * x[b, i, ...].
// Scaling the input channels by the styles instead of the weights keeps one shared weight
// (no per-sample weight tensor in memory); demodulation, a per-(b, o) factor, is applied in
// the epilogue. The convolution is an implicit GEMM on CUDA cores with fp32 accumulation:
// M = output channels, N = output pixels of one sample, K = I * k * k gathered on the fly.
#include "common.h"
#include "ops.h"

#include <ATen/Dispatch.h>

namespace mmfs_fast {
namespace {

constexpr float kDemodEps = 1e-8f;  // DEMOD_EPS of mmfs_fast/ops/modulated_conv2d.py
constexpr int kWarp = 32;

// demod[b, o] = rsqrt(sum_{i, t} (W[o, i, t] * styles[b, i])^2 + eps), one warp per (b, o).
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

struct ModConvParams {
  Strides4 x_stride, out_stride;
  int in_channels, in_h, in_w;
  int out_channels, out_h, out_w;
  int kernel_size, stride, padding;
};

// Block tile: kTileM output channels x kTileN pixels, kTileK reduction steps per stage;
// each of the 256 threads accumulates a 4 x 4 micro-tile strided by 16 (conflict-free reads).
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kMicro = 4, kLanes = 16;
static_assert(kLanes * kLanes == kThreads && kLanes * kMicro == kTileM && kLanes * kMicro == kTileN);

template <typename scalar_t, bool kTransposed>
__global__ void __launch_bounds__(kThreads)
    modconv_kernel(const scalar_t* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ styles,
                   const float* __restrict__ demod, scalar_t* __restrict__ out, ModConvParams p) {
  __shared__ float weight_tile[kTileK][kTileM + 1];  // +1: the transposing stores spread over banks
  __shared__ float input_tile[kTileK][kTileN];
  const int b = blockIdx.z, m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
  const int taps = p.kernel_size * p.kernel_size, reduction = p.in_channels * taps, pixels = p.out_h * p.out_w;
  const int lane_n = threadIdx.x % kLanes, lane_m = threadIdx.x / kLanes;
  const scalar_t* x_sample = x + b * p.x_stride.n;
  const float* styles_sample = styles + int64_t(b) * p.in_channels;

  float acc[kMicro][kMicro] = {};
  for (int k0 = 0; k0 < reduction; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTileK * kTileM; e += kThreads) {
      const int k = e % kTileK, m = e / kTileK;  // consecutive threads read one weight row
      const bool inside = m0 + m < p.out_channels && k0 + k < reduction;
      weight_tile[k][m] = inside ? weight[int64_t(m0 + m) * reduction + k0 + k] : 0.f;
    }
    for (int e = threadIdx.x; e < kTileK * kTileN; e += kThreads) {
      const int n = e % kTileN, k = e / kTileN;  // consecutive threads read consecutive pixels
      float value = 0.f;
      if (n0 + n < pixels && k0 + k < reduction) {
        const int i = (k0 + k) / taps, tap = (k0 + k) % taps;
        const int ky = tap / p.kernel_size, kx = tap % p.kernel_size;
        const int oy = (n0 + n) / p.out_w, ox = (n0 + n) % p.out_w;
        int iy, ix;
        bool hit;
        if constexpr (kTransposed) {
          // out[oy] gathers x[iy] through tap ky when iy * stride + ky - padding == oy.
          const int sy = oy + p.padding - ky, sx = ox + p.padding - kx;
          iy = sy / p.stride;
          ix = sx / p.stride;
          hit = sy >= 0 && sx >= 0 && sy % p.stride == 0 && sx % p.stride == 0;
        } else {
          iy = oy * p.stride - p.padding + ky;
          ix = ox * p.stride - p.padding + kx;
          hit = true;
        }
        if (hit && iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w) {
          value = float(x_sample[i * p.x_stride.c + iy * p.x_stride.y + ix * p.x_stride.x]) * styles_sample[i];
        }
      }
      input_tile[k][n] = value;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[kMicro], c[kMicro];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        a[j] = weight_tile[k][lane_m + kLanes * j];
        c[j] = input_tile[k][lane_n + kLanes * j];
      }
#pragma unroll
      for (int mi = 0; mi < kMicro; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kMicro; ++ni) acc[mi][ni] += a[mi] * c[ni];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < kMicro; ++mi) {
    const int o = m0 + lane_m + kLanes * mi;
    if (o >= p.out_channels) continue;
    const float scale = demod != nullptr ? demod[int64_t(b) * p.out_channels + o] : 1.f;
#pragma unroll
    for (int ni = 0; ni < kMicro; ++ni) {
      const int n = n0 + lane_n + kLanes * ni;
      if (n >= pixels) continue;
      const int oy = n / p.out_w, ox = n % p.out_w;
      out[b * p.out_stride.n + o * p.out_stride.c + oy * p.out_stride.y + ox * p.out_stride.x] =
          scalar_t(acc[mi][ni] * scale);
    }
  }
}

}  // namespace

at::Tensor modulated_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& styles,
                            bool demodulate, bool transposed, int64_t stride, int64_t padding) {
  constexpr const char* op = "mmfs_fast::modulated_conv2d";
  check_cuda_float(x, op, "x");
  check_cuda_float(weight, op, "weight");
  check_cuda_float(styles, op, "styles");
  check_same_device(x, weight, op, "weight");
  check_same_device(x, styles, op, "styles");
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": x must be float32, float16 or bfloat16, got float64");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && styles.dim() == 2, op,
              ": expected x (B, I, H, W), weight (O, I, k, k) and styles (B, I), got ", x.sizes(), ", ",
              weight.sizes(), ", ", styles.sizes());
  const int64_t batch = x.size(0), in_channels = x.size(1), out_channels = weight.size(0), k = weight.size(2);
  TORCH_CHECK(weight.size(1) == in_channels && weight.size(3) == k && k >= 1, op, ": weight ", weight.sizes(),
              " must be (O, ", in_channels, ", k, k)");
  TORCH_CHECK(styles.size(0) == batch && styles.size(1) == in_channels, op, ": styles must be (", batch, ", ",
              in_channels, "), got ", styles.sizes());
  TORCH_CHECK(stride >= 1 && padding >= 0 && stride < (1 << 15) && padding < (1 << 15), op,
              ": stride must be in [1, 32767] and padding in [0, 32767], got ", stride, " and ", padding);
  TORCH_CHECK(batch <= 65535 && out_channels * in_channels * k * k < (int64_t(1) << 31) &&
                  x.size(2) < (int64_t(1) << 15) && x.size(3) < (int64_t(1) << 15),
              op, ": sizes out of range: x ", x.sizes(), ", weight ", weight.sizes());
  const auto out_size = [&](int64_t in) {
    return transposed ? (in - 1) * stride - 2 * padding + k : (in + 2 * padding - k) / stride + 1;
  };
  const int64_t out_h = out_size(x.size(2)), out_w = out_size(x.size(3));
  TORCH_CHECK(out_h >= 1 && out_w >= 1 && (transposed || x.size(2) + 2 * padding >= k) &&
                  (transposed || x.size(3) + 2 * padding >= k),
              op, ": input ", x.sizes(), " with kernel ", k, ", stride ", stride, ", padding ", padding,
              " leaves an empty output");
  TORCH_CHECK(out_h * out_w < (int64_t(1) << 31), op, ": output of ", out_h, "x", out_w, " is too large");

  at::Tensor out = empty_with_layout_of(x, {batch, out_channels, out_h, out_w});
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Weights and styles are small: fp32 copies keep the products exact before accumulation.
  const at::Tensor weight_f = weight.to(at::kFloat).contiguous();
  const at::Tensor styles_f = styles.to(at::kFloat).contiguous();
  at::Tensor demod;
  if (demodulate) {
    demod = at::empty({batch, out_channels}, x.options().dtype(at::kFloat));
    const int64_t threads = batch * out_channels * kWarp;
    demod_kernel<<<ceil_div(threads, kThreads), kThreads, 0, stream>>>(
        weight_f.const_data_ptr<float>(), styles_f.const_data_ptr<float>(), demod.mutable_data_ptr<float>(),
        int(batch), int(out_channels), int(in_channels), int(k * k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const ModConvParams params{strides4(x), strides4(out), int(in_channels), int(x.size(2)), int(x.size(3)),
                             int(out_channels), int(out_h), int(out_w), int(k), int(stride), int(padding)};
  const dim3 grid(ceil_div(out_h * out_w, kTileN), ceil_div(out_channels, kTileM), batch);
  const auto launch = [&](auto scalar) {
    using scalar_t = decltype(scalar);
    auto kernel = transposed ? modconv_kernel<scalar_t, true> : modconv_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), weight_f.const_data_ptr<float>(),
                                          styles_f.const_data_ptr<float>(),
                                          demodulate ? demod.const_data_ptr<float>() : nullptr,
                                          out.mutable_data_ptr<scalar_t>(), params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_SWITCH(x.scalar_type(), "modulated_conv2d",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch(scalar_t{}); }));
  return out;
}

}  // namespace mmfs_fast
