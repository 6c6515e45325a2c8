// Runs the CUDA kernels of csrc/ and their launch plans on the CPU. The host-side index math
// (output sizes, argument checks, layout rules, kernel choice, grids, kernel parameters) is
// csrc/*_index.h itself; tests/test_cuda_index_math.py cuts the kernels out of the .cu files
// into kernels.inc, and this file gives them what they use of CUDA. For kernels that share
// memory, a block's threads are real threads that meet at __syncthreads (a
// std::barrier), so the shared-memory phases run as on a GPU; blocks run one after another.
// Instantiated for double data (the float weights and taps stay float, as in csrc/).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

#include "bias_act_index.h"
#include "index_math.h"
#include "styled_epilogue_index.h"
#include "upfirdn2d_index.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(threads)
#define __shared__ static  // one block at a time: static storage is that block's shared memory

using mmfs_fast::kThreads;

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim threadIdx, blockIdx;
Dim gridDim, blockDim;
std::barrier<>* block_barrier = nullptr;

void __syncthreads() {
  if (block_barrier == nullptr) {  // launch_serial's threads cannot meet
    std::fprintf(stderr, "cuda_host_harness: a kernel launched with launch_serial calls __syncthreads\n");
    std::abort();
  }
  block_barrier->arrive_and_wait();
}

namespace mmfs_fast {
template <class T>
using acc_type = T;  // csrc/common.h's accumulation type; double here
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

// For kernels whose threads never meet (no __syncthreads): each block's threads
// run one after another, without the cost of starting 256 threads per launch.
template <class Kernel>
void launch_serial(Dim grid, Kernel&& kernel) {
  gridDim = grid;
  blockDim = {kThreads, 1, 1};
  block_barrier = nullptr;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        for (unsigned t = 0; t < kThreads; ++t) {
          blockIdx = {x, y, z}, threadIdx = {t, 0, 0};
          kernel();
        }
}

IntArray ints(const int64_t* values, int64_t count) { return IntArray(values, size_t(count)); }

// null: the input is absent
std::optional<IntArray> optional_ints(const int64_t* values, int64_t count) {
  return values != nullptr ? std::optional<IntArray>(ints(values, count)) : std::nullopt;
}

// Runs body; a check that fails (STD_TORCH_CHECK throws) comes back as 1 and its message.
template <class Body>
int reporting(char* error, size_t error_size, Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" {

bool output_is_channels_last(const int64_t* sizes, const int64_t* strides, int64_t rank) {
  return mmfs_fast::output_is_channels_last(ints(sizes, rank), ints(strides, rank));
}

bool walks_in_memory_order(const int64_t* sizes, const int64_t* strides, int64_t rank) {
  return mmfs_fast::walks_in_memory_order(ints(sizes, rank), ints(strides, rank));
}

bool same_strides(const int64_t* a, const int64_t* b, int64_t rank) {
  return mmfs_fast::same_strides(ints(a, rank), ints(b, rank));
}

// out_hw: the output's height and width.
int upfirdn2d_output_size(const int64_t* x, int64_t x_rank, const int64_t* kernel, int64_t kernel_rank, int64_t up,
                          int64_t down, const int64_t* pad, int64_t pad_count, int64_t* out_hw, char* error,
                          size_t error_size) {
  return reporting(error, error_size, [&] {
    const Upfirdn2dSize size =
        mmfs_fast::upfirdn2d_output_size(ints(x, x_rank), ints(kernel, kernel_rank), up, down, ints(pad, pad_count));
    out_hw[0] = size.h, out_hw[1] = size.w;
  });
}

// plan: tiled (1 or 0), grid x, y, z.
void upfirdn2d_plan(const int64_t* x, const int64_t* x_strides, const int64_t* out, const int64_t* out_strides,
                    const int64_t* kernel, int64_t up, int64_t down, const int64_t* pad, unsigned* plan) {
  const Upfirdn2dLaunch launch = upfirdn2d_launch(
      upfirdn2d_params(ints(x, 4), ints(x_strides, 4), ints(out, 4), ints(out_strides, 4), ints(kernel, 2), up, down,
                       ints(pad, 4)));
  plan[0] = launch.tiled, plan[1] = launch.grid_x, plan[2] = launch.grid_y, plan[3] = launch.grid_z;
}

// The kernel upfirdn2d.cu's launch() picks, on its grid; max_grid_z > 0 caps gridDim.z lower
// than CUDA does, so that a few planes take the loop that more than 65535 planes take.
void upfirdn2d(const double* x_data, const float* taps, double* out_data, const int64_t* x, const int64_t* x_strides,
               const int64_t* out, const int64_t* out_strides, const int64_t* kernel, int64_t up, int64_t down,
               const int64_t* pad, unsigned max_grid_z) {
  const Upfirdn2dParams p = upfirdn2d_params(ints(x, 4), ints(x_strides, 4), ints(out, 4), ints(out_strides, 4),
                                             ints(kernel, 2), up, down, ints(pad, 4));
  Upfirdn2dLaunch plan = upfirdn2d_launch(p);
  if (max_grid_z > 0) plan.grid_z = std::min(plan.grid_z, max_grid_z);
  const Dim grid{plan.grid_x, plan.grid_y, plan.grid_z};
  dispatch_upfirdn2d(
      plan, p, [&] { launch_serial(grid, [&] { upfirdn2d_generic_kernel<double>(x_data, taps, out_data, p); }); },
      [&](auto up, auto down) {
        launch(grid, [&] {
          upfirdn2d_tiled_kernel<double, decltype(up)::value, decltype(down)::value>(x_data, taps, out_data, p);
        });
      });
}

// bias_act.cu's run(): the checks, the parameters, the kernel on its grid; x is walked as it
// is (the caller copies it when walks_in_memory_order says no). grad null: the forward.
// max_blocks > 0 caps the grid, so that the grid-stride loop takes several rounds.
int bias_act(const double* x_data, const double* bias, const double* grad, double* out, const int64_t* sizes,
             const int64_t* strides, int64_t rank, int64_t dim, double slope, double gain, double clamp,
             bool has_clamp, unsigned max_blocks, char* error, size_t error_size) {
  return reporting(error, error_size, [&] {
    const std::optional<double> clamp_value = has_clamp ? std::optional<double>(clamp) : std::nullopt;
    const char* op = grad != nullptr ? "mmfs_fast::bias_act_grad" : "mmfs_fast::bias_act";
    check_bias_act_args(op, ints(sizes, rank), dim, clamp_value);
    const BiasActParams p =
        bias_act_params(ints(sizes, rank), ints(strides, rank), dim, bias != nullptr, slope, gain, clamp_value);
    if (p.numel == 0) return;
    unsigned blocks = grid_stride_blocks(p.numel);
    if (max_blocks > 0) blocks = std::min(blocks, max_blocks);
    if (grad != nullptr) {
      launch_serial({blocks, 1, 1}, [&] { bias_act_kernel<double, true>(x_data, bias, grad, out, p); });
    } else {
      launch_serial({blocks, 1, 1}, [&] { bias_act_kernel<double, false>(x_data, bias, grad, out, p); });
    }
  });
}

// styled_epilogue.cu's checks and output size; a null shape: that input is absent. out_hw: the
// output's height and width.
int styled_epilogue_output_size(const int64_t* x, int64_t x_rank, const int64_t* demod, int64_t demod_rank,
                                const int64_t* bias, int64_t bias_rank, const int64_t* noise, int64_t noise_rank,
                                const int64_t* next_styles, int64_t next_styles_rank, const int64_t* blur,
                                int64_t blur_rank, int64_t blur_pad, int64_t* out_hw, char* error,
                                size_t error_size) {
  return reporting(error, error_size, [&] {
    const StyledEpilogueSize size = mmfs_fast::styled_epilogue_output_size(
        "mmfs_fast::styled_epilogue", ints(x, x_rank), ints(demod, demod_rank), ints(bias, bias_rank),
        optional_ints(noise, noise_rank), optional_ints(next_styles, next_styles_rank),
        optional_ints(blur, blur_rank), blur_pad);
    out_hw[0] = size.h, out_hw[1] = size.w;
  });
}

// styled_epilogue.cu's checks of unscaled_out (sizes and strides, rank 4) against the output.
int styled_epilogue_check_unscaled_out(bool has_next_styles, const int64_t* sizes, const int64_t* strides,
                                       int64_t rank, const int64_t* out_sizes, bool out_channels_last, char* error,
                                       size_t error_size) {
  return reporting(error, error_size, [&] {
    check_unscaled_out("mmfs_fast::styled_epilogue", has_next_styles, ints(sizes, rank), ints(strides, rank),
                       ints(out_sizes, 4), out_channels_last);
  });
}

// styled_epilogue.cu's host function after its checks and copies: the parameters and the kernel
// on its grid. x is walked as it is (the caller copies it when walks_in_memory_order says no),
// out has empty_with_layout_of's layout; a null pointer: that input is absent (blur_sizes with
// blur). max_blocks: see bias_act.
void styled_epilogue(const double* x_data, const float* demod, const float* bias, const double* noise,
                     const float* next_styles, const float* blur, double* out, double* unscaled, const int64_t* sizes,
                     const int64_t* strides, const int64_t* out_hw, int64_t noise_batch, const int64_t* blur_sizes,
                     int64_t blur_pad, double noise_strength, double slope, unsigned max_blocks) {
  const StyledEpilogueParams p =
      styled_epilogue_params(ints(sizes, 4), ints(strides, 4), {out_hw[0], out_hw[1]}, noise_batch,
                             next_styles != nullptr, optional_ints(blur_sizes, 2), blur_pad, noise_strength, slope);
  if (p.numel == 0) return;
  unsigned blocks = grid_stride_blocks(p.numel);
  if (max_blocks > 0) blocks = std::min(blocks, max_blocks);
  launch_serial({blocks, 1, 1}, [&] {
    styled_epilogue_kernel<double>(x_data, demod, bias, noise, next_styles, blur, out, unscaled, p);
  });
}

}  // extern "C"
