// upfirdn2d's index math: the kernels' parameters and index helpers, the output size with
// the argument checks, and the launch plan (which kernel, which grid). upfirdn2d.cu runs it
// on the GPU's host, tests/cuda_host_harness.cpp on the CPU.
#pragma once

#include "index_math.h"

#include <cstdlib>
#include <type_traits>

namespace mmfs_fast {

constexpr int kUpfirdn2dMaxKernel = 32;  // the generic kernel's largest FIR, and the largest up and down
constexpr int kTile = 32;                // output tile edge of the tiled kernel
constexpr int kFirSize = 4;              // its FIR size

struct Upfirdn2dParams {
  Strides4 in_stride, out_stride;
  int channels, planes;  // planes = N * C
  int in_h, in_w, out_h, out_w;
  int up, down, pad_x0, pad_y0;
  int kernel_h, kernel_w;
};

MMFS_FAST_HOST_DEVICE int floor_div(int a, int b) { return (a >= 0 ? a : a - b + 1) / b; }

// Output (oy, ox) reads upsampled-and-padded samples oy * down + t: tap t meets an input
// sample when oy * down + t - pad0 is a multiple of up; this is the first such t.
MMFS_FAST_HOST_DEVICE int first_tap(int upsampled, int up) { return ((-upsampled) % up + up) % up; }

struct Upfirdn2dSize {
  int64_t h, w;
};

// The output's height and width, after the checks of x (N, C, H, W), the kernel, up, down
// and pad (x0, x1, y0, y1) that need only their sizes.
inline Upfirdn2dSize upfirdn2d_output_size(IntArray x, IntArray kernel, int64_t up, int64_t down, IntArray pad) {
  constexpr const char* op = "mmfs_fast::upfirdn2d";
  STD_TORCH_CHECK(x.size() == 4, op, ": x must be (N, C, H, W), got ", format_ints(x));
  STD_TORCH_CHECK(kernel.size() == 2, op, ": kernel must be 2-D, got ", format_ints(kernel));
  STD_TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && kernel[0] <= kUpfirdn2dMaxKernel &&
                      kernel[1] <= kUpfirdn2dMaxKernel,
                  op, ": kernel must be between 1x1 and ", kUpfirdn2dMaxKernel, "x", kUpfirdn2dMaxKernel, ", got ",
                  format_ints(kernel));
  STD_TORCH_CHECK(up >= 1 && down >= 1 && up <= kUpfirdn2dMaxKernel && down <= kUpfirdn2dMaxKernel, op,
                  ": up and down must be in [1, ", kUpfirdn2dMaxKernel, "], got up=", up, " down=", down);
  STD_TORCH_CHECK(pad.size() == 4, op, ": pad must be (x0, x1, y0, y1), got ", format_ints(pad));
  for (const int64_t value : pad) {
    STD_TORCH_CHECK(std::abs(value) < (int64_t(1) << 24), op, ": pad ", format_ints(pad), " is out of range");
  }
  STD_TORCH_CHECK(x[2] * up + pad[2] + pad[3] >= kernel[0] && x[3] * up + pad[0] + pad[1] >= kernel[1], op,
                  ": input ", format_ints(x), " with kernel ", format_ints(kernel), ", up=", up, ", down=", down,
                  ", pad=", format_ints(pad), " leaves an empty output");
  STD_TORCH_CHECK(x[0] * x[1] < (int64_t(1) << 31) && x[2] * up < (int64_t(1) << 24) && x[3] * up < (int64_t(1) << 24),
                  op, ": x of shape ", format_ints(x), " is too large");
  return {(x[2] * up + pad[2] + pad[3] - kernel[0]) / down + 1, (x[3] * up + pad[0] + pad[1] - kernel[1]) / down + 1};
}

// After upfirdn2d_output_size's checks, which keep every value in int range.
inline Upfirdn2dParams upfirdn2d_params(IntArray x, IntArray x_strides, IntArray out, IntArray out_strides,
                                        IntArray kernel, int64_t up, int64_t down, IntArray pad) {
  return {strides4(x_strides), strides4(out_strides),
          int(x[1]),           int(x[0] * x[1]),
          int(x[2]),           int(x[3]),
          int(out[2]),         int(out[3]),
          int(up),             int(down),
          int(pad[0]),         int(pad[2]),
          int(kernel[0]),      int(kernel[1])};
}

// Which kernel runs on which grid. The shared-memory tiled kernel covers the 4x4 FIR with
// (up, down) in {(1, 1), (2, 1), (1, 2)}, a grid of tiles by planes (looped past gridDim.z's
// limit); the one-thread-per-output generic kernel covers everything else, grid-stride.
struct Upfirdn2dLaunch {
  bool tiled;
  unsigned grid_x, grid_y, grid_z;
};

inline Upfirdn2dLaunch upfirdn2d_launch(const Upfirdn2dParams& p) {
  const bool tiled = p.kernel_h == kFirSize && p.kernel_w == kFirSize && p.up * p.down <= 2 &&
                     ceil_div(p.out_h, kTile) <= kMaxGridYZ;
  if (tiled) {
    return {true, unsigned(ceil_div(p.out_w, kTile)), unsigned(ceil_div(p.out_h, kTile)),
            unsigned(std::min<int64_t>(p.planes, kMaxGridYZ))};
  }
  return {false, grid_stride_blocks(int64_t(p.planes) * p.out_h * p.out_w), 1, 1};
}

// Calls generic(), or tiled(kUp, kDown) with the tiled kernel's template arguments as
// std::integral_constant, for the kernel the plan names.
template <class Generic, class Tiled>
void dispatch_upfirdn2d(const Upfirdn2dLaunch& launch, const Upfirdn2dParams& p, Generic&& generic, Tiled&& tiled) {
  using std::integral_constant;
  if (!launch.tiled) {
    generic();
  } else if (p.up == 2) {
    tiled(integral_constant<int, 2>{}, integral_constant<int, 1>{});
  } else if (p.down == 2) {
    tiled(integral_constant<int, 1>{}, integral_constant<int, 2>{});
  } else {
    tiled(integral_constant<int, 1>{}, integral_constant<int, 1>{});
  }
}

}  // namespace mmfs_fast
