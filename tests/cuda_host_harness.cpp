// Runs the CUDA kernels of csrc/ on the CPU: tests/test_cuda_index_math.py cuts the kernels
// out of the .cu files into kernels.inc, and this file gives them what they use of CUDA.
// A block's threads are real threads that meet at __syncthreads (a std::barrier), so the
// kernels' shared-memory phases run as on a GPU; blocks run one after another. Instantiated
// for double data (the float weights and taps stay float, as in csrc/).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(threads)
#define __shared__ static  // one block at a time: static storage is that block's shared memory

constexpr int kThreads = 256;  // csrc/common.h's block size

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim threadIdx, blockIdx;
Dim gridDim, blockDim;
std::barrier<>* block_barrier = nullptr;

void __syncthreads() { block_barrier->arrive_and_wait(); }

// Warp shuffles through a per-warp exchange buffer, each warp's lanes meeting at their own
// barrier (whole warps may leave a kernel early, as on a GPU).
constexpr int kWarpSize = 32;
std::deque<std::barrier<>>* warp_barriers = nullptr;  // a deque: barriers do not move
float warp_exchange[kThreads / kWarpSize][kWarpSize];

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  warp_exchange[warp][lane] = value;
  (*warp_barriers)[warp].arrive_and_wait();
  const float other = warp_exchange[warp][lane ^ lane_mask];
  (*warp_barriers)[warp].arrive_and_wait();
  return other;
}

float rsqrtf(float value) { return 1.f / std::sqrt(value); }

namespace mmfs_fast {
template <class T>
using acc_type = T;  // csrc/common.h's accumulation type; double here
struct Strides4 {
  int64_t n, c, y, x;
};
#include "kernels.inc"
}  // namespace mmfs_fast

using namespace mmfs_fast;

namespace {

// Every thread walks the blocks in the same order and waits for the whole block after the
// kernel body, so no thread overwrites shared memory that another still reads.
template <class Kernel>
void launch(Dim grid, Kernel&& kernel) {
  gridDim = grid;
  blockDim = {kThreads, 1, 1};
  std::barrier<> barrier(kThreads);
  block_barrier = &barrier;
  std::deque<std::barrier<>> warps;
  for (int w = 0; w < kThreads / kWarpSize; ++w) warps.emplace_back(kWarpSize);
  warp_barriers = &warps;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
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
  for (auto& thread : threads) thread.join();
}

Strides4 strides(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

}  // namespace

extern "C" {

// tiled: 0 for the generic kernel, else the tiled kernel for (up, down).
void upfirdn2d(const double* x, const float* taps, double* out, const int64_t* in_stride,
               const int64_t* out_stride, const int* sizes, int tiled, unsigned grid_x, unsigned grid_y,
               unsigned grid_z) {
  // sizes: channels, planes, in_h, in_w, out_h, out_w, up, down, pad_x0, pad_y0, kernel_h, kernel_w
  const Upfirdn2dParams p{strides(in_stride), strides(out_stride), sizes[0], sizes[1], sizes[2], sizes[3],
                          sizes[4], sizes[5], sizes[6], sizes[7], sizes[8], sizes[9], sizes[10], sizes[11]};
  const Dim grid{grid_x, grid_y, grid_z};
  if (!tiled) {
    launch(grid, [&] { upfirdn2d_generic_kernel<double>(x, taps, out, p); });
  } else if (p.up == 2) {
    launch(grid, [&] { upfirdn2d_tiled_kernel<double, 2, 1>(x, taps, out, p); });
  } else if (p.down == 2) {
    launch(grid, [&] { upfirdn2d_tiled_kernel<double, 1, 2>(x, taps, out, p); });
  } else {
    launch(grid, [&] { upfirdn2d_tiled_kernel<double, 1, 1>(x, taps, out, p); });
  }
}

void demod(const float* weight, const float* styles, float* out, int batch, int out_channels, int in_channels,
           int taps) {
  const unsigned blocks = (int64_t(batch) * out_channels * kWarpSize + kThreads - 1) / kThreads;
  launch({blocks, 1, 1}, [&] { demod_kernel(weight, styles, out, batch, out_channels, in_channels, taps); });
}

void scale_channels(const double* src, const int64_t* src_stride, const float* scale, double* dst, int64_t numel,
                    int channels, int height, int width, bool channels_last, unsigned blocks) {
  const ScaleParams p{strides(src_stride), numel, channels, height, width, channels_last};
  launch({blocks, 1, 1}, [&] { scale_channels_kernel<double>(src, scale, dst, p); });
}

void bias_act(const double* x, const double* bias, const double* grad, double* out, int64_t numel,
              int64_t channel_stride, int64_t channels, double slope, double gain, double clamp, bool has_clamp,
              unsigned blocks) {
  const BiasActParams p{numel, channel_stride, channels, slope, gain, clamp, bias != nullptr, has_clamp};
  if (grad != nullptr) {
    launch({blocks, 1, 1}, [&] { bias_act_kernel<double, true>(x, bias, grad, out, p); });
  } else {
    launch({blocks, 1, 1}, [&] { bias_act_kernel<double, false>(x, bias, grad, out, p); });
  }
}

}  // extern "C"
