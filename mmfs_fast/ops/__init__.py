"""The op layer: one public function per op. upfirdn2d, bias_act and styled_epilogue dispatch
to ``ref`` (plain PyTorch), ``cuda`` (csrc/, built ahead of time) or ``triton`` (kernels/);
add_layer_norm, linear_silu and stem_conv to ref or triton; modulated_conv2d is plain PyTorch only (cuDNN's grouped
convolution on a GPU)."""
from mmfs_fast.ops import _backend
from mmfs_fast.ops import add_layer_norm as _add_layer_norm_module
from mmfs_fast.ops import bias_act as _bias_act_module
from mmfs_fast.ops import linear_silu as _linear_silu_module
from mmfs_fast.ops import stem_conv as _stem_conv_module
from mmfs_fast.ops import styled_epilogue as _styled_epilogue_module
from mmfs_fast.ops import upfirdn2d as _upfirdn2d_module
from mmfs_fast.ops.add_layer_norm import add_layer_norm
from mmfs_fast.ops.bias_act import bias_act
from mmfs_fast.ops._common import (blur_folded_down_weight, blur_pads, default_fir, demodulation, polyphase_up_pad,
                                   polyphase_up_weight, weight_energy)
from mmfs_fast.ops.linear_silu import linear_silu
from mmfs_fast.ops.modulated_conv2d import modulated_conv2d
from mmfs_fast.ops.stem_conv import stem_conv
from mmfs_fast.ops.styled_epilogue import styled_epilogue
from mmfs_fast.ops.upfirdn2d import upfirdn2d

# the ops with a choice of backend
_MODULES = {
    "upfirdn2d": _upfirdn2d_module,
    "bias_act": _bias_act_module,
    "styled_epilogue": _styled_epilogue_module,
    "add_layer_norm": _add_layer_norm_module,
    "linear_silu": _linear_silu_module,
    "stem_conv": _stem_conv_module,
}


def backends() -> dict[str, list[str]]:
    """For each op, the impls installed here (built, importable), fastest first."""
    return {op: [impl for impl in ("cuda", "triton", "ref")
                 if impl in module.IMPLEMENTATIONS and _backend.installed(impl)]
            for op, module in _MODULES.items()}


def backend_plan(device) -> dict[str, dict]:
    """For each op, the impl that ``impl="auto"`` runs on float32 tensors of ``device`` and
    why, and for each other impl why it cannot run there (None: it can)."""
    import torch

    device = torch.device(device)
    plan = {}
    for op, module in _MODULES.items():
        cannot = {impl: ("no implementation of this op" if impl not in module.IMPLEMENTATIONS
                         else _backend.why_not(impl, device)) for impl in ("cuda", "triton")}
        if device.type != "cuda":
            uses, why = "ref", "auto runs the plain PyTorch ref path on the CPU"
        else:
            uses = next(i for i in _backend.fastest_first(op) if i == "ref" or cannot.get(i) is None)
            why = "the fastest of the backends that can run here (measured order: ops/winners.json)"
        plan[op] = {"auto_uses": uses, "why": why, "cannot_run": {k: v for k, v in cannot.items() if v}}
    return plan


def cuda_extension_report() -> dict:
    """The CUDA extension: whether it loaded (else why not), the torch it was built against and
    the one it runs with, and which of its ops have a CUDA kernel registered."""
    import torch

    from mmfs_fast.ops import _cuda

    extension = _backend.cuda_extension()
    build = extension.build_info() if extension is not None else None
    return {
        "loaded": extension is not None,
        "off_because": _backend.cuda_extension_off(),
        "built_with_torch": build["torch_version"] if build else None,
        "runs_with_torch": torch.__version__,
        "supports_torch": f">={build['torch_target']}" if build else None,
        "cuda_kernels": {op: _cuda.defines(op) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"mmfs_fast::{op}", "CUDA") for op in _cuda.OPS},
    }


__all__ = ["upfirdn2d", "bias_act", "modulated_conv2d", "styled_epilogue", "add_layer_norm", "linear_silu",
           "stem_conv", "default_fir", "blur_pads", "demodulation",
           "weight_energy", "polyphase_up_weight", "polyphase_up_pad", "blur_folded_down_weight",
           "backends", "backend_plan", "cuda_extension_report"]
