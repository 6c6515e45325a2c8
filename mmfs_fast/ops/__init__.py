"""The op layer: one public function per op, each dispatching to ``ref`` (plain
PyTorch), ``cuda`` (csrc/, built ahead of time) or ``triton`` (kernels/)."""
from mmfs_fast.ops import _backend
from mmfs_fast.ops import bias_act as _bias_act_module
from mmfs_fast.ops import modulated_conv2d as _modulated_conv2d_module
from mmfs_fast.ops import upfirdn2d as _upfirdn2d_module
from mmfs_fast.ops.bias_act import bias_act
from mmfs_fast.ops._common import blur_pads, default_fir, demodulation, weight_energy
from mmfs_fast.ops.modulated_conv2d import modulated_conv2d
from mmfs_fast.ops.upfirdn2d import upfirdn2d

_MODULES = {
    "upfirdn2d": _upfirdn2d_module,
    "bias_act": _bias_act_module,
    "modulated_conv2d": _modulated_conv2d_module,
}


def backends() -> dict[str, list[str]]:
    """For each op, the impls installed here (built, importable), fastest first."""
    return {op: [impl for impl in ("cuda", "triton", "ref")
                 if impl in module.IMPLEMENTATIONS and _backend.installed(impl)]
            for op, module in _MODULES.items()}


__all__ = ["upfirdn2d", "bias_act", "modulated_conv2d", "default_fir", "blur_pads", "demodulation", "weight_energy",
           "backends"]
