// Runs the CUDA code of csrc/ on the CPU: tests/test_cuda_index_math.py cuts the kernels, the
// launch constants and helpers of common.h and upfirdn2d.cu's launch() out of the sources into
// kernels.inc (each `kernel<<<grid, threads, shared, stream>>>(args)` rewritten as a call of
// cuda_launch below), and this file gives them what they use of CUDA and ATen.
// A block's threads are real threads that meet at __syncthreads (a std::barrier), so the
// kernels' shared-memory phases run as on a GPU; blocks run one after another. Instantiated
// for double data (the float weights and taps stay float, as in csrc/).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(threads)
#define __shared__ static  // one block at a time: static storage is that block's shared memory
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;
std::barrier<>* block_barrier = nullptr;

void __syncthreads() { block_barrier->arrive_and_wait(); }

// Warp shuffles through a per-warp exchange buffer, each warp's lanes meeting at their own
// barrier (whole warps may leave a kernel early, as on a GPU).
constexpr int kWarpSize = 32, kMaxThreads = 1024;
std::deque<std::barrier<>>* warp_barriers = nullptr;  // a deque: barriers do not move
float warp_exchange[kMaxThreads / kWarpSize][kWarpSize];

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  warp_exchange[warp][lane] = value;
  (*warp_barriers)[warp].arrive_and_wait();
  const float other = warp_exchange[warp][lane ^ lane_mask];
  (*warp_barriers)[warp].arrive_and_wait();
  return other;
}

float rsqrtf(float value) { return 1.f / std::sqrt(value); }

// The last launch, for the tests to check the host code's choice of kernel and grid.
char last_kernel[128];
dim3 last_grid;
unsigned last_threads;

// Every thread walks the blocks in the same order and waits for the whole block after the
// kernel body, so no thread overwrites shared memory that another still reads.
template <class Kernel>
void cuda_launch(const char* name, dim3 grid, unsigned threads, size_t /*shared*/, int /*stream*/, Kernel&& kernel) {
  std::strncpy(last_kernel, name, sizeof(last_kernel) - 1);
  last_grid = grid, last_threads = threads;
  gridDim = grid;
  blockDim = {threads, 1, 1};
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::deque<std::barrier<>> warps;
  for (unsigned w = 0; w < threads / kWarpSize; ++w) warps.emplace_back(kWarpSize);
  warp_barriers = &warps;
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = {x, y, z};
            kernel();
            barrier.arrive_and_wait();
          }
    });
  }
  for (auto& worker : workers) worker.join();
}

// What the host code reads of ATen: the data of a tensor, and a stream to launch on.
namespace at {
template <class T>
using opmath_type = T;
struct Tensor {
  void* data;
  template <class T>
  const T* const_data_ptr() const { return static_cast<const T*>(data); }
  template <class T>
  T* mutable_data_ptr() const { return static_cast<T*>(data); }
};
namespace cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace at

namespace mmfs_fast {
#include "kernels.inc"
}  // namespace mmfs_fast

using namespace mmfs_fast;

namespace {
Strides4 strides(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

Upfirdn2dParams upfirdn2d_params(const int64_t* in_stride, const int64_t* out_stride, const int* sizes) {
  // sizes: channels, planes, in_h, in_w, out_h, out_w, up, down, pad_x0, pad_y0, kernel_h, kernel_w
  return {strides(in_stride), strides(out_stride), sizes[0], sizes[1], sizes[2], sizes[3],
          sizes[4], sizes[5], sizes[6], sizes[7], sizes[8], sizes[9], sizes[10], sizes[11]};
}
}  // namespace

extern "C" {

const char* launched_kernel() { return last_kernel; }
void launched_grid(unsigned* out) {
  out[0] = last_grid.x, out[1] = last_grid.y, out[2] = last_grid.z, out[3] = last_threads;
}
unsigned blocks_for(int64_t work) { return grid_stride_blocks(work); }

// upfirdn2d.cu's launch(): its choice of kernel and grid.
void upfirdn2d(const double* x, const float* taps, double* out, const int64_t* in_stride, const int64_t* out_stride,
               const int* sizes) {
  const at::Tensor x_t{const_cast<double*>(x)}, taps_t{const_cast<float*>(taps)};
  at::Tensor out_t{out};
  launch<double>(x_t, taps_t, out_t, upfirdn2d_params(in_stride, out_stride, sizes));
}

// The tiled kernel on a grid of the test's choosing (fewer blocks than planes).
void upfirdn2d_tiled_on_grid(const double* x, const float* taps, double* out, const int64_t* in_stride,
                             const int64_t* out_stride, const int* sizes, unsigned grid_z) {
  const Upfirdn2dParams p = upfirdn2d_params(in_stride, out_stride, sizes);
  const dim3 grid(ceil_div(p.out_w, kTile), ceil_div(p.out_h, kTile), grid_z);
  cuda_launch("upfirdn2d_tiled_kernel<double, 2, 1>", grid, kThreads, 0, 0,
              [&] { upfirdn2d_tiled_kernel<double, 2, 1>(x, taps, out, p); });
}

// modulated_conv2d()'s demodulation launch: one warp per (sample, output channel).
void demod(const float* weight, const float* styles, float* out, int batch, int out_channels, int in_channels,
           int taps) {
  const unsigned blocks = ceil_div(int64_t(batch) * out_channels * kWarp, kThreads);
  cuda_launch("demod_kernel", blocks, kThreads, 0, 0,
              [&] { demod_kernel(weight, styles, out, batch, out_channels, in_channels, taps); });
}

// The grid-stride kernels on `blocks` blocks (fewer than the host's, so that the loops take several rounds).
void scale_channels(const double* src, const int64_t* src_stride, const float* scale, double* dst, int64_t numel,
                    int channels, int height, int width, bool channels_last, unsigned blocks) {
  const ScaleParams p{strides(src_stride), numel, channels, height, width, channels_last};
  cuda_launch("scale_channels_kernel", blocks, kThreads, 0, 0,
              [&] { scale_channels_kernel<double>(src, scale, dst, p); });
}

void bias_act(const double* x, const double* bias, const double* grad, double* out, int64_t numel,
              int64_t channel_stride, int64_t channels, double slope, double gain, double clamp, bool has_clamp,
              unsigned blocks) {
  const BiasActParams p{numel, channel_stride, channels, slope, gain, clamp, bias != nullptr, has_clamp};
  if (grad != nullptr) {
    cuda_launch("bias_act_kernel", blocks, kThreads, 0, 0,
                [&] { bias_act_kernel<double, true>(x, bias, grad, out, p); });
  } else {
    cuda_launch("bias_act_kernel", blocks, kThreads, 0, 0,
                [&] { bias_act_kernel<double, false>(x, bias, grad, out, p); });
  }
}

}  // extern "C"
