// upfirdn2d: zero-insertion upsampling, padding/cropping, FIR filtering (true convolution)
// and decimation in one pass. A shared-memory tiled kernel covers the 4x4 FIR with
// (up, down) in {(1, 1), (2, 1), (1, 2)}, everything MMFS does in forward and backward;
// a one-thread-per-output kernel covers any other up/down/pad and kernels up to 32x32.
#include "common.h"
#include "ops.h"

namespace mmfs_fast {
namespace {

constexpr int kMaxKernelSize = 32;

struct Upfirdn2dParams {
  Strides4 in_stride, out_stride;
  int channels, planes;  // planes = N * C
  int in_h, in_w, out_h, out_w;
  int up, down, pad_x0, pad_y0;
  int kernel_h, kernel_w;
};

__device__ __forceinline__ int floor_div(int a, int b) { return (a >= 0 ? a : a - b + 1) / b; }

// Output (oy, ox) reads upsampled-and-padded samples oy * down + t: tap t meets an input
// sample when oy * down + t - pad0 is a multiple of up; this is the first such t.
__device__ __forceinline__ int first_tap(int upsampled, int up) { return ((-upsampled) % up + up) % up; }

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

constexpr int kTile = 32;     // output tile edge of the tiled kernel
constexpr int kFirSize = 4;   // its FIR size

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
  const bool tiled = p.kernel_h == kFirSize && p.kernel_w == kFirSize && p.up * p.down <= 2 &&
                     ceil_div(p.out_h, kTile) <= 65535;  // gridDim.y's limit
  if (tiled) {
    const dim3 grid(ceil_div(p.out_w, kTile), ceil_div(p.out_h, kTile), std::min(p.planes, 65535));
    if (p.up == 2) {
      upfirdn2d_tiled_kernel<scalar_t, 2, 1><<<grid, kThreads, 0, stream>>>(x_data, taps_data, out_data, p);
    } else if (p.down == 2) {
      upfirdn2d_tiled_kernel<scalar_t, 1, 2><<<grid, kThreads, 0, stream>>>(x_data, taps_data, out_data, p);
    } else {
      upfirdn2d_tiled_kernel<scalar_t, 1, 1><<<grid, kThreads, 0, stream>>>(x_data, taps_data, out_data, p);
    }
  } else {
    const int64_t total = int64_t(p.planes) * p.out_h * p.out_w;
    upfirdn2d_generic_kernel<scalar_t><<<grid_stride_blocks(total), kThreads, 0, stream>>>(
        x_data, taps_data, out_data, p);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

std::string pads_of(torch::headeronly::IntHeaderOnlyArrayRef pad) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < pad.size(); ++i) out << (i ? ", " : "") << pad[i];
  out << "]";
  return out.str();
}

}  // namespace

Tensor upfirdn2d(const Tensor& x, const Tensor& kernel, int64_t up, int64_t down,
                 torch::headeronly::IntHeaderOnlyArrayRef pad) {
  constexpr const char* op = "mmfs_fast::upfirdn2d";
  check_cuda_float(x, op, "x");
  check_cuda_float(kernel, op, "kernel");
  check_same_device(x, kernel, op, "kernel");
  STD_TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got ", shape_of(x));
  STD_TORCH_CHECK(kernel.dim() == 2, op, ": kernel must be 2-D, got ", shape_of(kernel));
  STD_TORCH_CHECK(kernel.size(0) <= kMaxKernelSize && kernel.size(1) <= kMaxKernelSize && kernel.numel() > 0, op,
                  ": kernel must be between 1x1 and ", kMaxKernelSize, "x", kMaxKernelSize, ", got ",
                  shape_of(kernel));
  STD_TORCH_CHECK(up >= 1 && down >= 1 && up <= kMaxKernelSize && down <= kMaxKernelSize, op,
                  ": up and down must be in [1, ", kMaxKernelSize, "], got up=", up, " down=", down);
  STD_TORCH_CHECK(pad.size() == 4, op, ": pad must be (x0, x1, y0, y1), got ", pads_of(pad));
  for (const int64_t value : pad) {
    STD_TORCH_CHECK(std::abs(value) < (int64_t(1) << 24), op, ": pad ", pads_of(pad), " is out of range");
  }
  const int64_t out_h = (x.size(2) * up + pad[2] + pad[3] - kernel.size(0)) / down + 1;
  const int64_t out_w = (x.size(3) * up + pad[0] + pad[1] - kernel.size(1)) / down + 1;
  STD_TORCH_CHECK(
      x.size(2) * up + pad[2] + pad[3] >= kernel.size(0) && x.size(3) * up + pad[0] + pad[1] >= kernel.size(1), op,
      ": input ", shape_of(x), " with kernel ", shape_of(kernel), ", up=", up, ", down=", down, ", pad=", pads_of(pad),
      " leaves an empty output");
  STD_TORCH_CHECK(x.size(0) * x.size(1) < (int64_t(1) << 31) && x.size(2) * up < (int64_t(1) << 24) &&
                      x.size(3) * up < (int64_t(1) << 24),
                  op, ": x of shape ", shape_of(x), " is too large");

  const int64_t out_shape[] = {x.size(0), x.size(1), out_h, out_w};
  Tensor out = empty_with_layout_of(x, out_shape);
  if (out.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  // The taps as fp32, whatever x's precision: a tiny copy, queued on the stream.
  const Tensor taps = torch::stable::contiguous(torch::stable::to(kernel, ScalarType::Float));
  const Upfirdn2dParams params{
      strides4(x), strides4(out),
      int(x.size(1)), int(x.size(0) * x.size(1)),
      int(x.size(2)), int(x.size(3)), int(out_h), int(out_w),
      int(up), int(down), int(pad[0]), int(pad[2]),
      int(kernel.size(0)), int(kernel.size(1))};
  MMFS_FAST_DISPATCH_FLOATING(x.scalar_type(), "upfirdn2d", [&] { launch<scalar_t>(x, taps, out, params); });
  return out;
}

}  // namespace mmfs_fast
