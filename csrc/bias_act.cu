// bias_act: clamp(act(x + bias) * gain) and its gradient, elementwise in memory order.
// linear, relu and lrelu are one activation, z > 0 ? z : slope * z, with slope 1, 0 and
// alpha; its derivative is piecewise constant, so the gradient kernel is also its own
// derivative with respect to the incoming gradient (the second-order backward).
#include "bias_act_index.h"
#include "common.h"
#include "ops.h"

namespace mmfs_fast {
namespace {

// kGrad: out = d(bias_act)/dx * grad, else out = bias_act(x). The order of the roundings
// follows the ref op's autograd: clamp mask, then gain, then the activation's slope.
template <typename scalar_t, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                    const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, BiasActParams p) {
  using acc_t = acc_type<scalar_t>;
  const acc_t slope = p.slope, gain = p.gain, clamp = p.clamp;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t z = x[i];
    if (p.has_bias) z += acc_t(bias[(i / p.channel_stride) % p.channels]);
    const acc_t y = (z > acc_t(0) ? z : z * slope) * gain;
    if constexpr (kGrad) {
      const bool passes = !p.has_clamp || (-clamp <= y && y <= clamp);
      const acc_t g = acc_t(grad[i]) * gain;
      out[i] = passes ? scalar_t(z > acc_t(0) ? g : g * slope) : scalar_t(0);
    } else {
      out[i] = p.has_clamp ? scalar_t(y > clamp ? clamp : (y < -clamp ? -clamp : y)) : scalar_t(y);
    }
  }
}

// x itself when the kernel can walk it in memory order, else a contiguous copy; the
// fake kernel in mmfs_fast/ops/_cuda.py makes the same choice.
Tensor dense(const Tensor& x) {
  return walks_in_memory_order(x.sizes(), x.strides()) ? x : torch::stable::contiguous(x);
}

template <bool kGrad>
Tensor run(const char* op, const Tensor* grad_in, const Tensor& x_in, const std::optional<Tensor>& bias,
           double slope, double gain, std::optional<double> clamp, int64_t dim) {
  check_cuda_float(x_in, op, "x");
  check_bias_act_args(op, x_in.sizes(), dim, clamp);
  if (bias.has_value()) {
    check_cuda_float(*bias, op, "bias");
    check_same_device(x_in, *bias, op, "bias");
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x_in.size(dim), op, ": bias must be 1-D of size x.shape[",
                    dim, "] = ", x_in.size(dim), ", got ", shape_of(*bias));
  }
  const Tensor x = dense(x_in);
  Tensor out = torch::stable::empty_like(x);
  Tensor grad;
  if constexpr (kGrad) {
    check_same_device(x_in, *grad_in, op, "grad");
    STD_TORCH_CHECK(shape_of(*grad_in) == shape_of(x_in) && grad_in->scalar_type() == x_in.scalar_type(), op,
                    ": grad must match x in shape and dtype, got ", shape_of(*grad_in), " ", grad_in->scalar_type(),
                    " and ", shape_of(x_in), " ", x_in.scalar_type());
    // The kernel walks grad and x with the same offsets.
    if (same_strides(grad_in->strides(), x.strides())) {
      grad = *grad_in;
    } else {
      grad = torch::stable::empty_like(x);
      torch::stable::copy_(grad, *grad_in);
    }
  }
  if (x.numel() == 0) return out;
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  // The ref op adds the bias in x's dtype.
  const Tensor bias_x =
      bias.has_value() ? torch::stable::contiguous(torch::stable::to(*bias, x.scalar_type())) : Tensor();
  const BiasActParams params = bias_act_params(x.sizes(), x.strides(), dim, bias.has_value(), slope, gain, clamp);
  const cudaStream_t stream = current_stream(x);
  MMFS_FAST_DISPATCH_FLOATING(x.scalar_type(), "bias_act", [&] {
    bias_act_kernel<scalar_t, kGrad><<<grid_stride_blocks(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), bias.has_value() ? bias_x.const_data_ptr<scalar_t>() : nullptr,
        kGrad ? grad.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), params);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

Tensor bias_act(const Tensor& x, const std::optional<Tensor>& bias, double slope, double gain,
                std::optional<double> clamp, int64_t dim) {
  return run<false>("mmfs_fast::bias_act", nullptr, x, bias, slope, gain, clamp, dim);
}

Tensor bias_act_grad(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& bias, double slope,
                     double gain, std::optional<double> clamp, int64_t dim) {
  check_cuda_float(grad, "mmfs_fast::bias_act_grad", "grad");
  return run<true>("mmfs_fast::bias_act_grad", &grad, x, bias, slope, gain, clamp, dim);
}

}  // namespace mmfs_fast
