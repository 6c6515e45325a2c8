"""The exact op calls the Stylizer and the Discriminator make, read off one forward
pass of each on the meta device (no memory, no compute), so the op benchmarks run
at the shapes the models really use.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import sys

import torch

from mmfs_fast import ops
from mmfs_fast.models import Discriminator, Stylizer, StylizerConfig
PUBLIC_OPS = {"upfirdn2d": ops.upfirdn2d, "bias_act": ops.bias_act, "modulated_conv2d": ops.modulated_conv2d}
# Small filter-tap tensors: their values do not change the timing, so they are replayed
# as the default FIR (real tensors rather than meta ones are needed to run the op).
FIR_ARGS = {"kernel", "fir"}
TENSOR_ARGS = {"x", "bias", "weight", "styles"} | FIR_ARGS


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One distinct call: the op, its tensor shapes and its other arguments."""
    op: str
    shapes: tuple[tuple[str, tuple[int, ...] | None], ...]  # (arg name, shape or None)
    options: tuple[tuple[str, object], ...]  # (arg name, value) of the non-tensor arguments

    @property
    def batch(self) -> int:
        return dict(self.shapes)["x"][0]

    @property
    def label(self) -> str:
        """A stable, readable id: x's shape plus what distinguishes the call."""
        shapes, options = dict(self.shapes), dict(self.options)
        parts = ["x" + "x".join(map(str, shapes["x"]))]
        if self.op == "modulated_conv2d":
            o, _, k, _ = shapes["weight"]
            parts += [f"o{o}k{k}", "demod" if options["demodulate"] else "nodemod"]
        elif self.op == "bias_act":
            parts += [options["act"], f"dim{options['dim']}"] + (["nobias"] if shapes["bias"] is None else [])
        elif self.op == "upfirdn2d":
            parts += ["pad" + "_".join(map(str, options["pad"]))]
        parts += [f"{name}{options[name]}" for name in ("up", "down") if options.get(name, 1) != 1]
        return "-".join(parts)

    def make_args(self, device, dtype, requires_grad: bool = False) -> dict:
        """Random inputs for this call, ready for the public op's keyword arguments; all in
        ``dtype`` as in a model cast with ``.to(dtype)``, FIR taps in fp32."""
        args = dict(self.options)
        for name, shape in self.shapes:
            if shape is None:
                args[name] = None
            elif name in FIR_ARGS:
                args[name] = ops.default_fir(device=device, dtype=torch.float32)
            else:
                scale = shape[1] ** -0.5 if name == "weight" else 1.0  # keeps outputs O(1), as in the model
                t = torch.randn(shape, device=device, dtype=dtype) * scale
                args[name] = t.requires_grad_(requires_grad)
        return args


def _signature(op: str, args, kwargs) -> OpCall:
    bound = inspect.signature(PUBLIC_OPS[op]).bind(*args, **kwargs)
    bound.apply_defaults()
    shapes, options = [], []
    for name, value in bound.arguments.items():
        if name in TENSOR_ARGS:
            shapes.append((name, None if value is None else tuple(value.shape)))
        elif name != "impl":
            options.append((name, value))
    return OpCall(op, tuple(shapes), tuple(options))


@contextlib.contextmanager
def _recording(counter: collections.Counter, model_name: str):
    """Wrap the public ops where the model modules imported them, counting each call."""
    patched = []
    for module in [m for name, m in sys.modules.items() if name.startswith("mmfs_fast.models")]:
        for op, fn in PUBLIC_OPS.items():
            if getattr(module, op, None) is fn:
                patched.append((module, op, fn))

    def recorder(op, fn):
        def record(*args, **kwargs):
            counter[(_signature(op, args, kwargs), model_name)] += 1
            return fn(*args, **kwargs)
        return record

    try:
        for module, op, fn in patched:
            setattr(module, op, recorder(op, fn))
        yield
    finally:
        for module, op, fn in patched:
            setattr(module, op, fn)


def op_calls(config: StylizerConfig, disc_size: int, disc_base: int,
             batches: tuple[int, ...]) -> list[tuple[OpCall, dict[str, int]]]:
    """Every distinct op call of a Stylizer inference forward (face + z) and a Discriminator forward,
    per batch size, with how often each model makes it in one forward."""
    counter: collections.Counter = collections.Counter()
    with torch.device("meta"):
        # eval: the modulated convolutions of inference go through the op (training runs them unfused)
        stylizer = Stylizer(config, impl="ref").eval()
        disc = Discriminator(disc_size, disc_base, impl="ref")
        for batch in batches:
            with _recording(counter, "stylizer"), torch.no_grad():
                stylizer(torch.empty(batch, 3, config.size, config.size), z=torch.empty(batch, config.style_dim))
            with _recording(counter, "discriminator"), torch.no_grad():
                disc(torch.empty(batch, 3, disc_size, disc_size))
    uses: dict[OpCall, dict[str, int]] = {}
    for (call, model_name), count in counter.items():
        uses.setdefault(call, {})[model_name] = count
    return sorted(uses.items(), key=lambda item: (item[0].op, item[0].batch, item[0].label))
