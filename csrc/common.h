// Helpers shared by the kernels' host code. Everything here is LibTorch's stable ABI
// (torch/csrc/stable, torch/headeronly): the extension calls libtorch only through its C
// shim, so one build loads under every torch release from TORCH_TARGET_VERSION on.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cuda_runtime.h>

#include <string>

#include "index_math.h"

namespace mmfs_fast {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// What the kernels accumulate in: fp32 for the 16-bit types, else the type itself.
template <typename T>
struct Accumulate {
  using type = T;
};
template <>
struct Accumulate<torch::headeronly::Half> {
  using type = float;
};
template <>
struct Accumulate<torch::headeronly::BFloat16> {
  using type = float;
};
template <typename T>
using acc_type = typename Accumulate<T>::type;

// Runs __VA_ARGS__ (a lambda) with `scalar_t` set to the C++ type of a floating dtype.
#define MMFS_FAST_DISPATCH_FLOATING(TYPE, NAME, ...)                                \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)  \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

// The stream torch queues work on for t's device, through the stable C shim.
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

inline Strides4 strides4(const Tensor& t) { return strides4(t.strides()); }

// "[2, 3, 8, 8]", for error messages.
inline std::string shape_of(const Tensor& t) { return format_ints(t.sizes()); }

inline std::string device_of(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : (t.is_cpu() ? "cpu" : "a non-CUDA device");
}

inline bool is_channels_last(const Tensor& t) { return is_channels_last(t.sizes(), t.strides()); }

// The layout rule of index_math.h's output_is_channels_last.
inline Tensor empty_with_layout_of(const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef shape) {
  return torch::stable::empty(shape, x.scalar_type(), std::nullopt, x.device(), std::nullopt,
                              output_is_channels_last(x.sizes(), x.strides())
                                  ? torch::headeronly::MemoryFormat::ChannelsLast
                                  : torch::headeronly::MemoryFormat::Contiguous);
}

inline bool is_kernel_float(ScalarType t) {
  return t == ScalarType::Double || t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

inline void check_cuda_float(const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", device_of(t));
  STD_TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": ", name,
                  " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* name) {
  STD_TORCH_CHECK(a.get_device_index() == b.get_device_index(), op, ": ", name, " is on ", device_of(b),
                  " but x is on ", device_of(a));
}

}  // namespace mmfs_fast
