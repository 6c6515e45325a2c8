// upfirdn2d: zero-insertion upsampling, padding/cropping, FIR filtering (true convolution)
// and decimation in one pass. A shared-memory tiled kernel covers the 4x4 FIR with
// (up, down) in {(1, 1), (2, 1), (1, 2)}, everything MMFS does in forward and backward;
// a one-thread-per-output kernel covers any other up/down/pad and kernels up to 32x32.
// The output size, the checks and the launch plan are in upfirdn2d_index.h.
#include "common.h"
#include "ops.h"
#include "upfirdn2d_index.h"

namespace mmfs_fast {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    upfirdn2d_generic_kernel(const scalar_t* __restrict__ x, const float* __restrict__ taps,
                             scalar_t* __restrict__ out, Upfirdn2dParams p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = int64_t(p.planes) * p.out_h * p.out_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int ox = idx % p.out_w;
    const int oy = (idx / p.out_w) % p.out_h;
    const int plane = idx / (int64_t(p.out_w) * p.out_h);
    const int n = plane / p.channels, c = plane % p.channels;
    const scalar_t* x_plane = x + n * p.in_stride.n + c * p.in_stride.c;
    const int uy = oy * p.down - p.pad_y0, ux = ox * p.down - p.pad_x0;
    acc_t acc = 0;
    for (int ty = first_tap(uy, p.up); ty < p.kernel_h; ty += p.up) {
      const int iy = (uy + ty) / p.up;  // exact: uy + ty is a multiple of up
      if (iy < 0 || iy >= p.in_h) continue;
      for (int tx = first_tap(ux, p.up); tx < p.kernel_w; tx += p.up) {
        const int ix = (ux + tx) / p.up;
        if (ix < 0 || ix >= p.in_w) continue;
        const float tap = taps[(p.kernel_h - 1 - ty) * p.kernel_w + (p.kernel_w - 1 - tx)];
        acc += acc_t(x_plane[iy * p.in_stride.y + ix * p.in_stride.x]) * acc_t(tap);
      }
    }
    out[n * p.out_stride.n + c * p.out_stride.c + oy * p.out_stride.y + ox * p.out_stride.x] = scalar_t(acc);
  }
}

// Each block stages the input samples its kTile x kTile outputs need (zeros outside the
// image) and the flipped taps in shared memory, then each thread computes 4 outputs.
template <typename scalar_t, int kUp, int kDown>
__global__ void __launch_bounds__(kThreads)
    upfirdn2d_tiled_kernel(const scalar_t* __restrict__ x, const float* __restrict__ taps,
                           scalar_t* __restrict__ out, Upfirdn2dParams p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kInTile = ((kTile - 1) * kDown + kFirSize - 1) / kUp + 2;
  __shared__ acc_t tile[kInTile][kInTile + 1];
  __shared__ acc_t flipped[kFirSize][kFirSize];

  if (threadIdx.x < kFirSize * kFirSize) {
    const int t = threadIdx.x;
    flipped[t / kFirSize][t % kFirSize] = taps[kFirSize * kFirSize - 1 - t];
  }
  const int oy0 = blockIdx.y * kTile, ox0 = blockIdx.x * kTile;
  const int iy0 = floor_div(oy0 * kDown - p.pad_y0, kUp), ix0 = floor_div(ox0 * kDown - p.pad_x0, kUp);

  for (int plane = blockIdx.z; plane < p.planes; plane += gridDim.z) {
    const int n = plane / p.channels, c = plane % p.channels;
    const scalar_t* x_plane = x + n * p.in_stride.n + c * p.in_stride.c;
    __syncthreads();  // the previous plane's tile is no longer read
    for (int i = threadIdx.x; i < kInTile * kInTile; i += kThreads) {
      const int iy = iy0 + i / kInTile, ix = ix0 + i % kInTile;
      const bool inside = iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w;
      tile[i / kInTile][i % kInTile] = inside ? acc_t(x_plane[iy * p.in_stride.y + ix * p.in_stride.x]) : acc_t(0);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int oy = oy0 + i / kTile, ox = ox0 + i % kTile;
      if (oy >= p.out_h || ox >= p.out_w) continue;
      const int uy = oy * kDown - p.pad_y0, ux = ox * kDown - p.pad_x0;
      acc_t acc = 0;
#pragma unroll
      for (int ty = 0; ty < kFirSize; ++ty) {
        if ((uy + ty) % kUp != 0) continue;
        const int row = floor_div(uy + ty, kUp) - iy0;
#pragma unroll
        for (int tx = 0; tx < kFirSize; ++tx) {
          if ((ux + tx) % kUp != 0) continue;
          acc += tile[row][floor_div(ux + tx, kUp) - ix0] * flipped[ty][tx];
        }
      }
      out[n * p.out_stride.n + c * p.out_stride.c + oy * p.out_stride.y + ox * p.out_stride.x] = scalar_t(acc);
    }
  }
}

template <typename scalar_t>
void launch(const Tensor& x, const Tensor& taps, Tensor& out, const Upfirdn2dParams& p) {
  const cudaStream_t stream = current_stream(x);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const float* taps_data = taps.const_data_ptr<float>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const Upfirdn2dLaunch plan = upfirdn2d_launch(p);
  const dim3 grid(plan.grid_x, plan.grid_y, plan.grid_z);
  dispatch_upfirdn2d(
      plan, p,
      [&] { upfirdn2d_generic_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x_data, taps_data, out_data, p); },
      [&](auto up, auto down) {
        upfirdn2d_tiled_kernel<scalar_t, decltype(up)::value, decltype(down)::value>
            <<<grid, kThreads, 0, stream>>>(x_data, taps_data, out_data, p);
      });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

Tensor upfirdn2d(const Tensor& x, const Tensor& kernel, int64_t up, int64_t down,
                 torch::headeronly::IntHeaderOnlyArrayRef pad) {
  constexpr const char* op = "mmfs_fast::upfirdn2d";
  check_cuda_float(x, op, "x");
  check_cuda_float(kernel, op, "kernel");
  check_same_device(x, kernel, op, "kernel");
  const Upfirdn2dSize size = upfirdn2d_output_size(x.sizes(), kernel.sizes(), up, down, pad);

  const int64_t out_shape[] = {x.size(0), x.size(1), size.h, size.w};
  Tensor out = empty_with_layout_of(x, out_shape);
  if (out.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  // The taps as fp32, whatever x's precision: a tiny copy, queued on the stream.
  const Tensor taps = torch::stable::contiguous(torch::stable::to(kernel, ScalarType::Float));
  const Upfirdn2dParams params =
      upfirdn2d_params(x.sizes(), x.strides(), out.sizes(), out.strides(), kernel.sizes(), up, down, pad);
  MMFS_FAST_DISPATCH_FLOATING(x.scalar_type(), "upfirdn2d", [&] { launch<scalar_t>(x, taps, out, params); });
  return out;
}

}  // namespace mmfs_fast
