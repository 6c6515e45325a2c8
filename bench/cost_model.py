"""What a GPU run costs, counted without a GPU: kernels launched, bytes read + written, FLOPs,
device→host syncs and layout conversions of each workload on the Engine's CUDA path, and the
time they predict on a given GPU.

The Engine runs on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes, strides and
devices, no memory, no arithmetic), so the full 512² model takes the fp16 CUDA path and the
backends the dispatcher picks for CUDA tensors, and a dispatch mode under it sees every aten
op and custom op (through its registered fake kernel) that reaches a device. Each op's cost is
declared here (``op_cost``); the time estimate is a roofline per kernel (bench/peaks.py, times
fitted efficiencies) plus per-kernel overheads (``Constants``), fitted to GPU measurements by
``--calibrate`` and written to bench/results/cost_model_calibration.json.

    python bench/cost_model.py                     # every workload at batch 1 and 32, tables
    python bench/cost_model.py guided_stylization --batch 1 --layers
    python bench/cost_model.py --json out.json     # the same as JSON
    python bench/cost_model.py --calibrate bench/results/h200-2026-11-26-04455a9/bench-e2e.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peaks  # noqa: E402  (bench/ is not a package)
from mmfs_fast import benchmark as mb  # noqa: E402
from mmfs_fast.encoders import CLIPEncoder, DINOEncoder  # noqa: E402
from mmfs_fast.engine import Engine  # noqa: E402
from mmfs_fast.engine.executor import Executor  # noqa: E402
from mmfs_fast.finetune import finetune  # noqa: E402
from mmfs_fast.models import N_LATENT, Stylizer  # noqa: E402
from mmfs_fast import ops  # noqa: E402
from mmfs_fast.ops import _backend  # noqa: E402

aten = torch.ops.aten
HERE = Path(__file__).resolve().parent
CALIBRATION_FILE = HERE / "results" / "cost_model_calibration.json"
# text_stylization (face + prompt → image in one call, Engine.stylize_text: the web page's and the
# service's) is not a benchmark scenario: predicted only
WORKLOADS = ("image_to_wplus", "text_to_wplus", "random_sampling", "guided_stylization", "text_stylization",
             "finetune_step")
INFERENCE_BATCHES = (1, 32)
FINETUNE_BATCH = 8


# -- counting --------------------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    """One op as the GPU sees it."""
    op: str
    layer: str
    kernels: int = 1
    bytes: float = 0.0
    flops: float = 0.0
    dtype: str = "fp32"
    tensor_cores: bool = False  # a convolution or matmul: compute peak, not just bandwidth
    syncs: int = 0  # device→host waits
    layout_conversions: int = 0  # explicit copies that only change the memory layout
    cudnn_transposes: int = 0  # NCHW↔NHWC passes cuDNN adds around a half-precision NCHW convolution
    transpose_bytes: float = 0.0  # their traffic, included in bytes
    graph: bool = False  # inside a CUDA graph replay
    region: int = 0  # n > 0: in the n-th pair of parallel chains (Executor.side_by_side)
    branch: bool = False  # in the region, on the second stream's chain (else the current stream's)
    needs_grad: bool = False  # an input requires grad: autograd will run this op's backward
    estimated: bool = False  # not dispatched but derived (a backward from its forward)


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# ops that allocate or reinterpret without touching memory
_FREE_OPS = {torch.ops.prim.device.default, aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default, aten.set_.source_Tensor,
             aten.resize_.default, aten.record_stream.default}
_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default,
             aten.nonzero.default, aten.masked_select.default}
_COPY_OPS = {aten._to_copy.default, aten.copy_.default, aten.clone.default}
_CONV_OPS = {aten.convolution.default, aten._convolution.default}
_ADDED_INPUT_MATMULS = {aten.addmm.default, aten.baddbmm.default, aten.addmm_.default, aten.baddbmm_.default,
                        aten.addmm.out, aten.baddbmm.out, aten._addmm_activation.default}
_MATMUL_OPS = {aten.mm.default, aten.bmm.default, *_ADDED_INPUT_MATMULS}
# one fused (flash / memory-efficient) kernel on CUDA; the first is CompositeImplicit, kept whole
_ATTENTION_OPS = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_efficient_attention.default,
                  aten._scaled_dot_product_flash_attention.default}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: a broadcast (stride-0) dimension is read once."""
    if t.numel() == 0:
        return 0
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def _stride_order(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(sorted((d for d in range(t.ndim) if t.shape[d] > 1), key=lambda d: -t.stride(d)))


def _is_layout_change(src: torch.Tensor, dst: torch.Tensor) -> bool:
    return src.shape == dst.shape and src.ndim >= 3 and _stride_order(src) != _stride_order(dst)


def _dtype_of(tensors: list[torch.Tensor]) -> str:
    return next((_DTYPE_NAMES[t.dtype] for t in tensors if t.dtype in _DTYPE_NAMES), "fp32")


def _conv_flops(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, transposed: bool) -> float:
    """2 × multiply-adds: per output pixel, or per input pixel of a transposed convolution."""
    per_pixel = weight.shape[1] * math.prod(weight.shape[2:])
    return 2.0 * (x.numel() if transposed else out.numel()) * per_pixel


def _is_nchw_half(x: torch.Tensor) -> bool:
    return x.dtype in _DTYPE_NAMES and x.ndim == 4 and x.is_contiguous() and x.shape[1] > 1


def _custom_op_cost(name: str, args, out_tensors) -> dict:
    """Declared costs of mmfs_fast's own ops, one kernel each (csrc/, kernels/)."""
    ins = _tensors(args)
    traffic = sum(touched_bytes(t) for t in ins) + sum(touched_bytes(t) for t in out_tensors)
    out = out_tensors[0]
    if name.endswith("upfirdn2d"):
        fir, up = args[1], args[2]
        return dict(bytes=traffic, flops=2.0 * out.numel() * fir.numel() / up ** 2)
    if name.endswith("styled_epilogue"):
        # one pass: x read once (the blur's windows overlap in cache), y written, plus demod, bias, a
        # noise plane, next_styles and the taps; unscaled_out, an argument the op only writes, is
        # counted once among them. Per output element: the blur's multiply-adds, a multiply-add, the
        # select, the noise's multiply-add and the next styles' multiply.
        noise, next_styles, blur = args[3], args[6], args[7]
        per_element = (3.0 + 2.0 * (noise is not None) + (next_styles is not None)
                       + (0 if blur is None else 2.0 * blur.numel()))
        return dict(bytes=traffic, flops=per_element * out.numel())
    if name.endswith("stem_conv"):  # the convolution on tensor cores, the output written once
        return dict(bytes=traffic, flops=_conv_flops(args[0], args[1], out, transposed=False), tensor_cores=True)
    if name.endswith("linear_silu"):  # a GEMM on tensor cores, the SiLU in its epilogue
        x, weight = args[0], args[1]
        return dict(bytes=traffic, flops=2.0 * x.shape[0] * x.shape[1] * weight.shape[0], tensor_cores=True)
    return dict(bytes=traffic, flops=float(out.numel()))  # bias_act and its gradient: one pass


def _added_in_place(func, args, kwargs, out: torch.Tensor) -> bool:
    """Whether a matmul's added input costs no pass of its own on CUDA (aten/src/ATen/native/cuda/
    Blas.cpp): it is the output (addmm_, baddbmm_, out= itself), or addmm's bias of one value per
    output column, which cuBLASLt adds in its epilogue (beta = 1, a contiguous output)."""
    added = args[0]
    if func in (aten.addmm_.default, aten.baddbmm_.default) or out is added:
        return True
    if kwargs.get("beta", 1) == 0:
        return True
    bias_like = (added.is_contiguous() and added.squeeze().ndim <= 1 and added.shape[-1] == out.shape[-1]
                 and (added.ndim == 1 or added.shape[0] == 1))
    bias_matmul = func in (aten.addmm.default, aten.addmm.out, aten._addmm_activation.default)
    return (bias_matmul and kwargs.get("beta", 1) == 1 and bias_like and out.is_contiguous()
            and min(args[1].shape) > 1 and min(args[2].shape) > 1)


def op_cost(func, args, kwargs, out) -> dict | None:
    """Kernels, bytes and FLOPs of one dispatched op on CUDA; None for ops that launch nothing."""
    if func in _FREE_OPS or getattr(func, "is_view", False):
        return None
    outs = _tensors(out)
    # an out= buffer is written, not read: it counts once, as the output
    ins = _tensors((args, {name: value for name, value in kwargs.items() if name != "out"}))
    on_device = [t for t in ins + outs if t.device.type == "cuda"]
    if not on_device and func not in _COPY_OPS:
        return None  # host-side work (tokenising, index math on the CPU)
    if func in _SYNC_OPS:
        return dict(kernels=0, syncs=1, bytes=sum(touched_bytes(t) for t in ins))
    traffic = sum(touched_bytes(t) for t in ins) + sum(touched_bytes(t) for t in outs)
    if func in _COPY_OPS:
        src = args[1] if func is aten.copy_.default else args[0]
        dst = outs[0]
        if src.device.type != dst.device.type:
            to_host = dst.device.type == "cpu"
            return dict(kernels=1, bytes=touched_bytes(src), syncs=int(to_host))
        return dict(bytes=traffic, layout_conversions=int(_is_layout_change(src, dst)))
    if func in _CONV_OPS:
        x, weight, bias, transposed = args[0], args[1], args[2], args[6]
        cost = dict(bytes=traffic, flops=_conv_flops(x, weight, outs[0], transposed), tensor_cores=True)
        if bias is not None:  # PyTorch adds a cuDNN convolution's bias in a pass of its own
            cost.update(kernels=2, bytes=traffic + 2 * touched_bytes(outs[0]))
        if _is_nchw_half(x):  # NHWC tensor-core kernels: input and output transposed around them
            extra = 2 * (touched_bytes(x) + touched_bytes(outs[0]))
            cost.update(cudnn_transposes=2, transpose_bytes=extra, bytes=cost["bytes"] + extra)
        return cost
    if func is aten.convolution_backward.default:
        grad, x, weight = args[0], args[1], args[2]
        transposed, mask = args[6], args[9]
        flops = _conv_flops(x, weight, grad, transposed) * (int(mask[0]) + int(mask[1]))
        cost = dict(kernels=sum(mask), bytes=traffic + touched_bytes(grad) * (sum(mask) - 1), flops=flops,
                    tensor_cores=True)
        if _is_nchw_half(x):
            extra = 2 * (touched_bytes(x) + 2 * touched_bytes(grad))
            cost.update(cudnn_transposes=3, transpose_bytes=extra, bytes=cost["bytes"] + extra)
        return cost
    if func in _MATMUL_OPS:
        added = func in _ADDED_INPUT_MATMULS
        a, b = (args[1], args[2]) if added else (args[0], args[1])
        cost = dict(bytes=traffic, flops=2.0 * a.numel() * b.shape[-1], tensor_cores=True)
        if added and not _added_in_place(func, args, kwargs, outs[0]):
            # cuBLAS adds C from the output buffer itself: ATen first copies the added input there
            cost.update(kernels=2, bytes=traffic + touched_bytes(args[0]) + touched_bytes(outs[0]))
        return cost
    if func in _ATTENTION_OPS:
        q, k = args[0], args[1]
        return dict(bytes=traffic, flops=4.0 * q.numel() * k.shape[-2], tensor_cores=True)
    if func is aten._native_multi_head_attention.default:  # inference fast path: in/out projections + attention
        q, embed = args[0], args[0].shape[-1]
        tokens = q.numel() // embed
        return dict(kernels=6, bytes=traffic, tensor_cores=True,
                    flops=8.0 * tokens * embed * embed + 4.0 * tokens * q.shape[-2] * embed)
    if func.namespace == "mmfs_fast":
        return _custom_op_cost(func.name(), args, outs)
    if func.name().startswith("aten::_foreach"):  # multi-tensor apply: ~24 tensors per launch
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        return dict(kernels=max(1, math.ceil(len(lists[0]) / 24)), bytes=traffic)
    return dict(bytes=traffic, flops=float(sum(t.numel() for t in outs)))


def _leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd would accumulate gradients into, found by walking the graph."""
    seen, leaves, todo = set(), [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _decomposes(func) -> bool:
    """Whether CUDA runs the op as its decomposition: a composite without a CUDA kernel of its own
    (rms_norm's fused kernel, say, is both)."""
    return (func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
            and not func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA))


class _Layers:
    """Which module each op runs in: a stack of module paths kept by global forward hooks."""

    def __init__(self):
        self.stack: list[tuple[torch.nn.Module, str]] = []
        self.names: dict[int, str] = {}  # id(module) → its path in a named root

    def name_modules(self, owner: object) -> None:
        """Name the modules ``owner`` holds (its attributes that are modules) by their paths."""
        for attr, value in vars(owner).items():
            if isinstance(value, torch.nn.Module):
                for path, module in value.named_modules(prefix=attr):
                    self.names.setdefault(id(module), path)
            elif hasattr(value, "model") and isinstance(value.model, torch.nn.Module):  # encoders
                for path, module in value.model.named_modules(prefix=attr):
                    self.names.setdefault(id(module), path)

    def _pre(self, module, args):
        if id(module) in self.names:
            path = self.names[id(module)]
        elif self.stack:
            parent, parent_path = self.stack[-1]
            name = next((n for n, m in parent._modules.items() if m is module), type(module).__name__)
            path = f"{parent_path}.{name}"
        else:
            path = type(module).__name__
        self.stack.append((module, path))
        return None

    def _post(self, module, args, output):
        if self.stack and self.stack[-1][0] is module:
            self.stack.pop()
        return None

    @contextlib.contextmanager
    def hooked(self):
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._pre)
        post = torch.nn.modules.module.register_module_forward_hook(self._post, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()

    def current(self) -> str | None:
        """The running op's module path, to depth 3; None outside every module."""
        return ".".join(self.stack[-1][1].split(".")[:3]) if self.stack else None


class CostRecorder(TorchDispatchMode):
    """Records a Kernel per dispatched op while ``recording``; answers a data-dependent read
    (``.item()``, ``bool(t)``) with 1 (fake tensors hold no values) and counts it as a sync."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.recording = False
        self.layers = _Layers()
        self.eager_paths: tuple[str, ...] = ()
        self.captured = False  # inside a function the Engine runs as a CUDA graph
        self.regions = 0  # pairs of parallel chains recorded so far
        self.region, self.branch = 0, False  # the chain being recorded (see Kernel)
        self._step_start = 0  # first kernel of the current optimisation step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default):
            out = True if args[0].dtype == torch.bool else 1
        elif func not in _FREE_OPS and func not in _ATTENTION_OPS and _decomposes(func):
            # what CUDA runs is the decomposition (conv2d → convolution, linear → addmm, ...)
            with self:
                return func.decompose(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if self.recording:
            cost = op_cost(func, args, kwargs, out)
            if cost is not None:
                path = self.layers.current()
                in_graph = (path is not None or self.captured) and not (path or "").startswith(self.eager_paths)
                layer = "outside modules" if path is None else path
                dtype = _dtype_of(_tensors((args, kwargs)) + _tensors(out))
                needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors((args, kwargs)))
                if cost.get("syncs") and self.kernels and self.kernels[-1].syncs and not self.kernels[-1].kernels:
                    return out  # nothing launched since the last wait: reading more (.tolist()) waits no more
                self.kernels.append(Kernel(op=func.name().split("::")[-1], layer=layer, dtype=dtype,
                                           graph=in_graph and cost.get("syncs", 0) == 0, needs_grad=needs_grad,
                                           region=self.region, branch=self.branch, **cost))
        return out

    def estimated_backward(self, loss: torch.Tensor) -> None:
        """Stands in for ``loss.backward()``, which fake CUDA tensors cannot run (autograd's
        engine asks the driver for a CUDA context): appends each differentiable forward op's
        backward, estimated from it (tensor-core ops: input and weight gradients, twice the
        FLOPs and traffic; the rest: one pass reading the gradient and a saved input, writing
        a gradient), and gives the leaves zero gradients so the optimiser step runs."""
        start = self._step_start
        self._step_start = len(self.kernels)
        backward = []
        for k in reversed(self.kernels[start:]):
            if not k.needs_grad or k.estimated:
                continue
            scale = 2 if k.tensor_cores else 1.5
            backward.append(dataclasses.replace(
                k, op=f"{k.op}_backward", kernels=2 * k.kernels if k.tensor_cores else k.kernels,
                bytes=scale * k.bytes, flops=2 * k.flops if k.tensor_cores else k.flops,
                needs_grad=False, estimated=True, syncs=0, layout_conversions=0))
        self.kernels.extend(backward)
        self._step_start = len(self.kernels)
        recording, self.recording = self.recording, False
        for leaf in _leaves(loss):
            leaf.grad = torch.zeros_like(leaf)
        self.recording = recording

    @contextlib.contextmanager
    def record(self, eager_paths: tuple[str, ...] = ()):
        """Record the ops run inside; modules whose path starts with one of ``eager_paths``
        run outside the CUDA graphs (so does everything outside a module)."""
        self.kernels, self.recording, self.eager_paths, self._step_start = [], True, eager_paths, 0
        self.regions = 0
        try:
            with self.layers.hooked(), mock.patch.object(
                torch.Tensor, "backward", lambda loss, *args, **kwargs: self.estimated_backward(loss)):
                yield self.kernels
        finally:
            self.recording = False


class _FusedAttention(TorchFunctionMode):
    """Attention as the fused memory-efficient kernel, as on an H100/H200: on fake tensors torch
    would choose its math path (it asks the device which kernels exist). The fused kernel's
    output is (B, L, heads, d) in memory, as on the GPU, so reading it back as (B, L, heads·d)
    is a view, not a copy; its log-sum-exp is kept only where autograd needs it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout, causal = (list(args) + [None, 0.0, False])[:6]
            mask = kwargs.get("attn_mask", mask)
            out, *_ = aten._scaled_dot_product_efficient_attention(
                q, k, v, mask, torch.is_grad_enabled(), kwargs.get("dropout_p", dropout),
                kwargs.get("is_causal", causal), scale=kwargs.get("scale"))
            return out
        return func(*args, **kwargs)


class _HostGenerator(torch.Generator):
    """A CUDA generator needs a CUDA driver; fake random ops take any generator."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu")

    def __init__(self, device="cpu"):
        pass


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode that builds modules on fake CUDA tensors, and a CostRecorder over it.

    Workarounds make the package run on fake tensors: a fake tensor's mode is shared by its
    deep copies (not copied with it); the mode's memo of converted tensors is dropped before
    Module._apply swaps a parameter (swap_tensors refuses tensors with weak references); CUDA
    generators, their states and pinned memory, which need a driver, are host ones; CUDA autocast stays on
    (bf16, as on an H100/H200); attention under autograd is the fused kernel; optimisers take their
    multi-tensor (foreach) CUDA path, which they do not recognise fake tensors for.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swap_tensors = torch.utils.swap_tensors

    def swap_forgetting_memo(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        swap_tensors(t1, t2)

    recorder = CostRecorder()
    # fused Adam (fine-tuning's optimizer on CUDA) has no fake kernel: an in-place no-op on meta
    # lets the recorder count it as the one multi-tensor kernel it is
    fused_adam = torch.library.Library("aten", "IMPL")
    for overload in ("_fused_adam_", "_fused_adam_.tensor_lr"):
        fused_adam.impl(overload, lambda *args, **kwargs: None, "Meta")
    with (mock.patch.object(torch, "Generator", _HostGenerator),
          mock.patch.object(torch.cuda, "get_rng_state", lambda *a, **k: torch.random.get_rng_state()),
          mock.patch.object(torch.cuda, "set_rng_state", lambda *a, **k: None),
          mock.patch.object(torch.Tensor, "pin_memory", lambda self, *a, **k: self),
          mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
          mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True),
          mock.patch("torch.optim.adam._default_to_fused_or_foreach", lambda *a, **k: (False, True)),
          mock.patch.object(FakeTensorMode, "__deepcopy__", lambda self, memo: self, create=True),
          mock.patch.object(torch.utils, "swap_tensors", swap_forgetting_memo),
          mode, recorder, _FusedAttention()):
        yield recorder


# -- the workloads -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Models:
    """Random-initialised models on fake CUDA: the full-size profile unless given another."""
    engine: object
    stylizer: object
    clip: object
    dino: object | None


def build_models(profile=None, with_dino: bool = True, with_clip: bool = True) -> Models:
    """Inside fake_cuda(): the Engine as bench/ runs it (fp16, style caches off; with an fp16
    CLIP unless with_clip=False) and the fp32 Stylizer, CLIP and DINO fine-tuning takes."""

    profile = profile or mb.FULL
    device = torch.device("cuda")
    stylizer = Stylizer(profile.stylizer).to(device).eval().requires_grad_(False)
    clip = CLIPEncoder(random_init=True, device=device, dtype=torch.float16) if with_clip else None
    # cuda_graphs=False: there is no graph to capture on fake tensors; CostRecorder marks
    # the ops a graph would replay instead
    engine = Engine(stylizer, clip, precision="fp16", device=device, cuda_graphs=False, style_cache_size=0)
    fp32_clip = CLIPEncoder(random_init=True, device=device) if with_dino else None
    dino = DINOEncoder(random_init=True, device=device) if with_dino else None
    return Models(engine, stylizer, fp32_clip, dino)


def _inference_call(models: Models, workload: str, batch: int) -> Callable[[], object]:

    engine = models.engine
    size, dim = engine.config.size, engine.config.style_dim
    faces = torch.zeros(batch, 3, size, size, device="cuda")
    w_plus = torch.zeros(batch, N_LATENT, dim, device="cuda")
    prompts = [mb.PROMPTS[i % len(mb.PROMPTS)] for i in range(batch)]
    return {"image_to_wplus": lambda: engine.style_from_image(faces),
            "text_to_wplus": lambda: engine.style_from_text(prompts),
            "random_sampling": lambda: engine.stylize_seed(faces, list(range(batch))),
            "guided_stylization": lambda: engine.stylize(faces, w_plus),
            "text_stylization": lambda: engine.stylize_text(faces, prompts)}[workload]


def _finetune_calls(models: Models, batch: int, steps: int) -> Callable[[], object]:

    faces = torch.zeros(batch, 3, models.stylizer.config.size, models.stylizer.config.size, device="cuda")
    return lambda: finetune(models.stylizer, models.clip, models.dino, faces, text="a pop art portrait",
                            steps=steps, decay_steps=0, capture=False, batch_size=batch, progress=False)


def count(recorder: CostRecorder, models: Models, workload: str, batch: int) -> list[Kernel]:
    """The kernels of one call of ``workload`` (one optimisation step for "finetune_step": the
    difference between runs of 2 and 1 eager steps at constant lr, which share setup and read-back)."""
    if workload == "finetune_step":
        runs = []
        for steps in (1, 2):
            call = _finetune_calls(models, batch, steps)
            # the step runs as one CUDA graph on a GPU (FinetuneRun captures it after warm-up steps)
            with recorder.record(eager_paths=()) as kernels:
                call()
            runs.append(kernels)
        return _difference(runs[1], runs[0])
    call = _inference_call(models, workload, batch)
    recorder.layers.name_modules(models.engine)
    run_captured = Executor._call

    def replayed(executor, fn, inputs):
        """The Engine runs uncaptured here: what a replay adds is added by hand (engine/executor.py
        copies each input into the graph's static buffer before it, the output out of it after),
        and every op of the function, outside a module or not, is one the graph replays."""
        kernels.extend(Kernel("copy_", "outside modules", bytes=2 * touched_bytes(x)) for x in inputs)
        recorder.captured = True
        try:
            out = run_captured(executor, fn, inputs)
        finally:
            recorder.captured = False
        kernels.append(Kernel("clone", "outside modules", bytes=2 * touched_bytes(out)))
        return out

    def side_by_side(executor, branch, main):
        """In order on fake CUDA (no streams), each kernel marked with its chain of the region."""
        recorder.regions += 1
        recorder.region, recorder.branch = recorder.regions, True
        try:
            first = branch()
            recorder.branch = False
            second = main()
        finally:
            recorder.region, recorder.branch = 0, False
        return first, second

    with recorder.record() as kernels, mock.patch.object(Executor, "_call", replayed), \
            mock.patch.object(Executor, "side_by_side", side_by_side):
        call()
    return kernels


def _difference(longer: list[Kernel], shorter: list[Kernel]) -> list[Kernel]:
    """The kernels ``longer`` has beyond ``shorter``: the multiset difference by (op, layer, size)."""
    left = defaultdict(int)
    for k in shorter:
        left[(k.op, k.layer, k.bytes, k.flops)] += 1
    extra = []
    for k in longer:
        key = (k.op, k.layer, k.bytes, k.flops)
        if left[key]:
            left[key] -= 1
        else:
            extra.append(k)
    return extra


# -- time -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Constants:
    """What the roofline leaves out, fitted per GPU kind (bench/results/cost_model_calibration.json).

    memory_efficiency: achieved fraction of peak HBM bandwidth of a memory-bound kernel;
    compute_efficiency: of peak tensor-core FLOP/s of a convolution or matmul;
    graph_gap_us: GPU time between two kernels of a CUDA graph replay (a graph removes the CPU's
    launch cost, not the GPU's per-kernel scheduling, ramp-up and tail);
    launch_us: CPU time to launch one kernel eagerly (eager kernels overlap their launches);
    sync_us: one device→host wait; call_us: host work per Engine call (checks, copies, Python);
    cudnn_transposes: 1 if cuDNN transposes NCHW half-precision tensors around its NHWC
    tensor-core kernels, 0 if it reads NCHW directly (fitted: only a profile can tell).
    """
    memory_efficiency: float = 0.7
    compute_efficiency: float = 0.5
    graph_gap_us: float = 2.0
    launch_us: float = 5.0
    sync_us: float = 15.0
    call_us: float = 100.0
    cudnn_transposes: float = 1.0


def load_constants(device: str = "H200") -> Constants:
    if CALIBRATION_FILE.is_file():
        fitted = json.loads(CALIBRATION_FILE.read_text()).get(device, {}).get("constants")
        if fitted:
            return Constants(**fitted)
    return Constants()


def kernel_seconds(k: Kernel, peak: peaks.Peak, c: Constants) -> float:
    """Roofline time of one op's kernels on the GPU, overheads excluded."""
    memory = (k.bytes - (1 - c.cudnn_transposes) * k.transpose_bytes) / (peak.gbps * 1e9 * c.memory_efficiency)
    if not k.tensor_cores:
        return memory
    compute = k.flops / (peak.tflops[k.dtype] * 1e12 * c.compute_efficiency)
    return max(memory, compute)


def predict_seconds(kernels: list[Kernel], peak: peaks.Peak, c: Constants, calls: int = 1) -> dict:
    """Predicted time of the recorded run, split into where it goes."""
    return _predict_arrays(_as_arrays(kernels, peak), c, calls)


# Engine calls (public entry points) per workload, for Constants.call_us
CALLS = {"image_to_wplus": 1, "text_to_wplus": 1, "random_sampling": 1, "guided_stylization": 1,
         "text_stylization": 1, "finetune_step": 1}


def totals(kernels: list[Kernel]) -> dict:
    return {"kernels": sum(k.kernels for k in kernels),
            "graph_kernels": sum(k.kernels for k in kernels if k.graph),
            "bytes": sum(k.bytes for k in kernels), "flops": sum(k.flops for k in kernels),
            "syncs": sum(k.syncs for k in kernels),
            "layout_conversions": sum(k.layout_conversions for k in kernels),
            "cudnn_transposes": sum(k.cudnn_transposes for k in kernels)}


def by_layer(kernels: list[Kernel], peak: peaks.Peak, c: Constants) -> list[dict]:
    """Per layer (in order of first appearance): totals and predicted GPU µs, overheads included."""
    rows: dict[str, list[Kernel]] = {}
    for k in kernels:
        rows.setdefault(k.layer, []).append(k)
    out = []
    for layer, ks in rows.items():
        gap = c.graph_gap_us if ks[0].graph else c.launch_us
        seconds = sum(kernel_seconds(k, peak, c) for k in ks) + sum(k.kernels for k in ks) * gap * 1e-6
        out.append({"layer": layer, **totals(ks), "predicted_us": seconds * 1e6})
    return out


def _cost_kind(k: Kernel) -> str:
    if k.tensor_cores:
        return "convolutions and matmuls"
    if k.op in ("upfirdn2d",):
        return "FIR resampling (upfirdn2d)"
    if k.op.startswith("_to_copy") or k.op.startswith("copy_") or k.op.startswith("clone"):
        return "copies and casts"
    if k.bytes < 1 << 20:
        return "small ops (< 1 MiB: styles, demodulation, mapping)"
    return "elementwise passes over activations"


def top_costs(kernels: list[Kernel], peak: peaks.Peak, c: Constants, n: int = 5) -> list[dict]:
    """The n biggest items of predicted time: the per-kernel overheads (graph gaps, launches),
    cuDNN's layout transposes, and the kernels' own time by kind."""
    items: dict[str, float] = defaultdict(float)
    for k in kernels:
        items["per-kernel overhead (graph gap / launch)"] += k.kernels * (
            c.graph_gap_us if k.graph else c.launch_us) * 1e-6
        own = kernel_seconds(k, peak, c)
        if k.cudnn_transposes:
            transposes = kernel_seconds(dataclasses.replace(k, tensor_cores=False, bytes=k.transpose_bytes), peak, c)
            items["cuDNN NCHW↔NHWC transposes"] += transposes
            own -= transposes
        items[_cost_kind(k)] += own
    items["device→host syncs"] = sum(k.syncs for k in kernels) * c.sync_us * 1e-6
    ranked = sorted(items.items(), key=lambda kv: -kv[1])[:n]
    return [{"cost": name, "predicted_us": round(s * 1e6, 1)} for name, s in ranked if s > 0]


# -- what would close the gap: the same kernels with one change each ---------------------------

def _decoder_layer(k: Kernel) -> bool:
    layer = k.layer.split(".")
    return len(layer) >= 2 and layer[1].startswith(("decoder", "to_rgb"))


def _fused_epilogue(kernels: list[Kernel]) -> list[Kernel]:
    """Demodulation, bias, noise, activation (and the encoder's bias_act) written by the
    convolution's epilogue: their passes over the activations go."""
    return [k for k in kernels if not (k.graph and not k.tensor_cores and k.bytes >= 1 << 20
                                       and k.op not in ("upfirdn2d",) and "copy" not in k.op
                                       and (_decoder_layer(k) or k.op == "bias_act"))]


def _channels_last(kernels: list[Kernel]) -> list[Kernel]:
    return [dataclasses.replace(k, bytes=k.bytes - k.transpose_bytes, transpose_bytes=0, cudnn_transposes=0)
            for k in kernels]


def _polyphase_upsampling(kernels: list[Kernel]) -> list[Kernel]:
    """The blur after each transposed convolution folded into its weights (four phases of one
    stride-1 convolution, 4× its multiply-adds) and the phases interleaved by the pass after
    the convolution: the decoder's upfirdn2d passes after a transposed convolution, or the
    pixel shuffles of the polyphase form, go."""
    def upsampling(k: Kernel) -> bool:
        return k.op in ("upfirdn2d", "pixel_shuffle") and k.layer.split(".")[1:2] != [] and \
            k.layer.split(".")[1].startswith("decoder")
    transposed = {k.layer for k in kernels if upsampling(k) and k.op == "upfirdn2d"}
    return [dataclasses.replace(k, flops=4 * k.flops) if k.op == "convolution" and k.layer in transposed else k
            for k in kernels if not upsampling(k)]


def _batched_styles(kernels: list[Kernel]) -> list[Kernel]:
    """All layers' style affines and demodulation coefficients in one kernel per call (they
    depend on w+ only): the decoder's small ops become 2 launches."""
    small = [k for k in kernels if k.graph and _decoder_layer(k) and not k.tensor_cores and k.bytes < 1 << 20]
    rest = [k for k in kernels if not any(k is s for s in small)]
    if not small:
        return rest
    merged = Kernel(op="styles", layer="decoder styles", kernels=2, bytes=sum(k.bytes for k in small),
                    flops=sum(k.flops for k in small), graph=True)
    return rest + [merged]


CHANGES = {"fused epilogue after each conv": _fused_epilogue, "channels-last (no cuDNN transposes)": _channels_last,
           "polyphase upsampling, interleaved by the next pass": _polyphase_upsampling,
           "styles and demodulation batched": _batched_styles}


def plan(kernels: list[Kernel], peak: peaks.Peak, c: Constants, calls: int) -> list[dict]:
    """Each change alone and all so far together: predicted ms and gain."""
    base = predict_seconds(kernels, peak, c, calls)["total_s"]
    rows, cumulative = [], kernels
    for name, change in CHANGES.items():
        alone = predict_seconds(change(kernels), peak, c, calls)["total_s"]
        cumulative = change(cumulative)
        together = predict_seconds(cumulative, peak, c, calls)["total_s"]
        rows.append({"change": name, "gain_ms": round((base - alone) * 1e3, 3),
                     "cumulative_ms": round(together * 1e3, 3)})
    return rows


# -- measurements and calibration ---------------------------------------------------------------

def measured_ms(paths: list[str], config: str = "mmfs-fast") -> dict[tuple[str, int], float]:
    """(scenario, batch) → median ms of ``config`` in pytest-benchmark JSON files."""
    out = {}
    for path in paths:
        for b in json.loads(Path(path).read_text())["benchmarks"]:
            info = b.get("extra_info", {})
            if info.get("config") == config and "scenario" in info and "batch" in info:
                out[(info["scenario"], info["batch"])] = b["stats"]["median"] * 1e3
    return out


def _as_arrays(kernels: list[Kernel], peak: peaks.Peak) -> dict:
    import numpy as np

    def column(f):
        return np.array([f(k) for k in kernels], dtype=float)

    return {"bytes": column(lambda k: k.bytes - k.transpose_bytes), "transpose_bytes": column(lambda k: k.transpose_bytes),
            "flop_s": column(lambda k: k.flops / (peak.tflops[k.dtype] * 1e12) if k.tensor_cores else 0.0),
            "kernels": column(lambda k: k.kernels), "transposes": column(lambda k: k.cudnn_transposes),
            "graph": column(lambda k: k.graph).astype(bool), "syncs": column(lambda k: k.syncs).sum(),
            "region": column(lambda k: k.region).astype(int), "branch": column(lambda k: k.branch).astype(bool),
            "gbps": peak.gbps * 1e9}


def _predict_arrays(a: dict, c: Constants, calls: int) -> dict:
    """The prediction on _as_arrays columns (vectorised for the fit): each kernel its roofline
    time, a graph's kernels one gap each, eager ones the longer of their GPU time and the CPU's
    launches. A region's two chains (a graph's parallel branches) share the GPU: each one's gaps
    can pass while the other's kernels run, but their own times add, as each is the time on the
    whole GPU; so a region takes the longest of either chain and their kernels' own times together
    (``overlapped_s``: what it saves on the two in order)."""
    import numpy as np

    memory = (a["bytes"] + c.cudnn_transposes * a["transpose_bytes"]) / (a["gbps"] * c.memory_efficiency)
    own = np.maximum(memory, a["flop_s"] / c.compute_efficiency)
    launches = a["kernels"] + a["transposes"] * c.cudnn_transposes
    graph, eager = a["graph"], ~a["graph"]
    graph_own = np.where(graph, own, 0.0)
    graph_time = graph_own + np.where(graph, launches * c.graph_gap_us * 1e-6, 0.0)
    overlapped_s = 0.0
    for r in np.unique(a["region"][a["region"] > 0]):
        chains = [(a["region"] == r) & a["branch"], (a["region"] == r) & ~a["branch"]]
        times = [graph_time[chain].sum() for chain in chains]
        overlapped_s += sum(times) - max(*times, sum(graph_own[chain].sum() for chain in chains))
    graph_s = graph_time.sum() - overlapped_s
    eager_s = max(own[eager].sum(), launches[eager].sum() * c.launch_us * 1e-6)
    sync_s, host_s = a["syncs"] * c.sync_us * 1e-6, calls * c.call_us * 1e-6
    return {"total_s": graph_s + eager_s + sync_s + host_s, "graph_s": graph_s, "eager_s": eager_s,
            "sync_s": sync_s, "host_s": host_s, "overlapped_s": overlapped_s}


def calibrate(counted: dict[tuple[str, int], list[Kernel]], measured: dict[tuple[str, int], float],
              peak: peaks.Peak) -> tuple[Constants, list[dict]]:
    """Constants minimising the squared log error of predicted vs measured time over a grid.

    End-to-end totals barely constrain compute_efficiency (the fit puts every workload on the
    memory side of the roofline), so its grid stops at 0.7, about what cuDNN reaches on large
    half-precision convolutions; a profile's per-kernel times pin it."""
    import itertools

    points = [(key, _as_arrays(counted[key], peak), measured[key] * 1e-3) for key in measured if key in counted]
    grid = itertools.product((0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                             (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                             (0.5, 1, 1.5, 2, 3, 4, 6, 8), (2, 4, 6, 10), (0, 25, 50, 100, 200, 400, 600),
                             (0.0, 1.0))
    best, best_error = None, math.inf
    for mem, comp, gap, launch, call, transposes in grid:
        c = Constants(mem, comp, gap, launch, Constants.sync_us, call, transposes)
        error = sum(math.log(_predict_arrays(a, c, CALLS[key[0]])["total_s"] / seconds) ** 2
                    for key, a, seconds in points)
        if error < best_error:
            best, best_error = c, error
    rows = [{"workload": key[0], "batch": key[1], "measured_ms": round(measured[key], 3),
             "predicted_ms": round(predict_seconds(counted[key], peak, best, CALLS[key[0]])["total_s"] * 1e3, 3)}
            for key, _, _ in points]
    for row in rows:
        row["error"] = f"{row['predicted_ms'] / row['measured_ms'] - 1:+.0%}"
    return best, rows


# -- the command line ----------------------------------------------------------------------------

def backend_orders() -> dict[str, list[str]]:
    """The dispatcher's order per op, from the same winners file: the counted path is the one
    "auto" takes on a GPU (the first backend installed here, so build the extension first)."""
    return {op: [impl for impl in _backend.fastest_first(op) if impl in installed]
            for op, installed in ops.backends().items()}


def run(workloads, batches, forms: dict[str, str] | None = None) -> dict:
    """Count and predict each workload at each batch size (fine-tuning at its own batch).
    forms: convolution kind ("upsample", "downsample", "stem") → one of its _backend.CONV_FORMS, forced
    for every such convolution (to predict which form wins); the kinds not named take
    winners.json's form per shape, as the Engine runs."""
    results = {}
    forms = forms or {}
    winner, wins_somewhere = _backend.conv_form, _backend.form_wins_somewhere
    forced = mock.patch.multiple(
        _backend, conv_form=lambda kind, *shape: forms[kind] if kind in forms else winner(kind, *shape),
        form_wins_somewhere=lambda kind, form, *ch: forms[kind] == form if kind in forms else wins_somewhere(kind, form, *ch))
    with forced, fake_cuda() as recorder:
        models = build_models(with_dino="finetune_step" in workloads)
        for workload in workloads:
            for batch in ((FINETUNE_BATCH,) if workload == "finetune_step" else batches):
                kernels = count(recorder, models, workload, batch)
                results[(workload, batch)] = kernels
    return results


def report(workload: str, batch: int, kernels: list[Kernel], peak: peaks.Peak, c: Constants,
           measured: float | None) -> dict:
    prediction = predict_seconds(kernels, peak, c, CALLS[workload])
    t = totals(kernels)
    return {"workload": workload, "batch": batch, **t, "bytes_per_image": t["bytes"] / batch,
            "predicted_ms": round(prediction["total_s"] * 1e3, 3),
            "measured_ms": None if measured is None else round(measured, 3),
            "split_ms": {k[:-2]: round(v * 1e3, 3) for k, v in prediction.items() if k != "total_s"},
            "top_costs": top_costs(kernels, peak, c), "plan": plan(kernels, peak, c, CALLS[workload]),
            "layers": by_layer(kernels, peak, c)}


def format_report(r: dict, layers: bool) -> str:
    lines = [f"## {r['workload']}, batch {r['batch']}",
             f"kernels {r['kernels']} ({r['graph_kernels']} in CUDA graphs) · {r['bytes'] / 1e9:.3f} GB "
             f"({r['bytes_per_image'] / 1e6:.1f} MB per image) · {r['flops'] / 1e9:.1f} GFLOP · syncs {r['syncs']} · "
             f"layout conversions {r['layout_conversions']} (+ {r['cudnn_transposes']} modelled cuDNN transposes)",
             f"predicted {r['predicted_ms']:.3f} ms (" + ", ".join(f"{k} {v:.3f}" for k, v in r["split_ms"].items())
             + ")" + ("" if r["measured_ms"] is None else f" · measured {r['measured_ms']:.3f} ms"),
             "top costs: " + "; ".join(f"{t['cost']} {t['predicted_us'] / 1e3:.3f} ms" for t in r["top_costs"])]
    if r["workload"] != "finetune_step":
        lines.append("changes: " + "; ".join(f"{p['change']} −{p['gain_ms']:.3f} ms" for p in r["plan"])
                     + f" → all {r['plan'][-1]['cumulative_ms']:.3f} ms")
    if layers:
        lines += ["", "| layer | kernels | MB | GFLOP | syncs | layout conv. | predicted µs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['layer']} | {row['kernels']} | {row['bytes'] / 1e6:.1f} | {row['flops'] / 1e9:.2f} | "
                  f"{row['syncs']} | {row['layout_conversions']} | {row['predicted_us']:.1f} |" for row in r["layers"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="*", help=f"default: all of {', '.join(WORKLOADS)}")
    p.add_argument("--batch", type=int, nargs="+", default=list(INFERENCE_BATCHES),
                   help="inference batch sizes (fine-tuning runs at batch 8)")
    p.add_argument("--device", default="H200", help="GPU of bench/peaks.py to predict for")
    p.add_argument("--measured", nargs="*", default=[], help="bench-e2e JSON to show measured ms beside")
    p.add_argument("--calibrate", nargs="+", metavar="BENCH_JSON",
                   help="fit the constants to these measurements and write " + str(CALIBRATION_FILE.name))
    p.add_argument("--layers", action="store_true", help="per-layer tables")
    for kind, which in (("upsample", "the decoder's upsampling convolutions"),
                        ("downsample", "the encoder's downsampling convolutions"),
                        ("stem", "the encoder's first convolution")):
        p.add_argument(f"--{kind}", choices=("winners", *_backend.CONV_FORMS[kind]), default="winners",
                       help=f"form of {which} (default: winners.json's, per shape)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    peak = peaks.peak_for(args.device)
    if peak is None:
        p.error(f"no peak figures for {args.device!r} in bench/peaks.py")
    workloads = args.workloads or list(WORKLOADS)
    if unknown := set(workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    measured = measured_ms(args.measured + (args.calibrate or []))
    c = load_constants(args.device)
    batches = sorted(set(args.batch) | ({b for _, b in measured} if args.calibrate else set()))
    counted = run(workloads, batches, {kind: getattr(args, kind) for kind in _backend.CONV_FORMS
                                       if getattr(args, kind) != "winners"})
    if args.calibrate:
        c, errors = calibrate(counted, measured, peak)
        calibration = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.is_file() else {}
        calibration[args.device] = {"constants": dataclasses.asdict(c), "fitted_to": args.calibrate,
                                    "predicted_vs_measured": errors}
        CALIBRATION_FILE.write_text(json.dumps(calibration, indent=1) + "\n")
        print(f"constants for {args.device}: {c}\n" + "\n".join(
            f"  {e['workload']} b{e['batch']}: measured {e['measured_ms']} ms, predicted {e['predicted_ms']} ms "
            f"({e['error']})" for e in errors))
    reports = [report(w, b, ks, peak, c, measured.get((w, b))) for (w, b), ks in counted.items()
               if w == "finetune_step" or b in args.batch]
    print(f"# cost model: {args.device}, constants {dataclasses.asdict(c)}; custom-op backends for CUDA "
          f"tensors, fastest first ({_backend.WINNERS_FILE.name}): {backend_orders()}\n")
    print("\n\n".join(format_report(r, args.layers) for r in reports))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "constants": dataclasses.asdict(c),
                                               "backends": backend_orders(), "results": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
