"""The inference forms of the layers of :mod:`mmfs_fast.models.layers`: frozen, with their
equalized-lr scales and activation gains folded into the weights, styles and demodulation
coefficients in fp32 and only activations and conv weights in the inference dtype (fp16 cannot
overflow). :func:`prepare_stylizer` swaps them into a copy of a Stylizer; the Engine runs it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.models.layers import (ConvLayer, EqualLinear, FusedLeakyReLU, ModulatedConv2d, ResBlock, StyledConv,
                                     shared_weight_conv)
from mmfs_fast.models.stylizer import Stylizer
from mmfs_fast.ops import (_backend, bias_act, default_fir, demodulation, modulated_conv2d, polyphase_up_pad,
                           polyphase_up_weight, styled_epilogue, weight_energy)
from mmfs_fast.ops.bias_act import ACTIVATIONS
from mmfs_fast.ops.styled_epilogue import IMPLEMENTATIONS as EPILOGUE_IMPLS

LRELU = ACTIVATIONS["lrelu"]  # StyleGAN2's leaky ReLU: slope 0.2, gain sqrt(2)


class _Linear(nn.Module):
    """EqualLinear with its learning-rate scales folded in, in fp32 (styles stay fp32)."""

    def __init__(self, layer: EqualLinear):
        super().__init__()
        self.register_buffer("weight", (layer.weight * layer.scale).detach().float())
        bias = None if layer.bias is None else (layer.bias * layer.lr_mul).detach().float()
        self.register_buffer("bias", bias)
        self.activation = layer.activation
        self.impl = layer.impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return bias_act(F.linear(x, self.weight), self.bias, act="lrelu", impl=self.impl)
        return F.linear(x, self.weight, self.bias)


def _conv_layer(layer: ConvLayer, dtype: torch.dtype, conv_adds_bias: bool, out_scale: float = 1.0) -> nn.Sequential:
    """ConvLayer ([Blur] → EqualConv2d → [FusedLeakyReLU]) as [Blur] → Conv2d → bias and
    leaky ReLU in one pass, its output times ``out_scale`` (> 0).

    The activation's gain moves into weight and bias: lrelu(z)·g = lrelu(g·z) for g > 0.
    conv_adds_bias: the convolution adds the bias, then an in-place leaky ReLU (oneDNN adds it
    in its own epilogue, so on the CPU one pass over the output instead of three); otherwise the
    bias_act op adds it (on CUDA one kernel, where PyTorch adds a cuDNN convolution's bias in a
    pass of its own).
    """
    *blurs, equal_conv = [m for m in layer if not isinstance(m, FusedLeakyReLU)]
    activation = layer[-1] if isinstance(layer[-1], FusedLeakyReLU) else None
    gain = out_scale * (LRELU.default_gain if activation is not None else 1.0)
    bias = activation.bias if activation is not None else equal_conv.bias
    bias = None if bias is None else (bias * gain).detach().to(dtype)
    out_ch, in_ch, k, _ = equal_conv.weight.shape
    conv = nn.Conv2d(in_ch, out_ch, k, equal_conv.stride, equal_conv.padding,
                     bias=bias is not None and conv_adds_bias, device=equal_conv.weight.device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(equal_conv.weight * (equal_conv.scale * gain))
        if conv.bias is not None:
            conv.bias.copy_(bias)
    modules = [copy.deepcopy(blur).to(dtype=dtype) for blur in blurs] + [conv.requires_grad_(False)]
    if activation is not None:
        modules.append(nn.LeakyReLU(LRELU.default_alpha, inplace=True) if conv_adds_bias else _BiasLeakyReLU(bias))
    return nn.Sequential(*modules)


class _BiasLeakyReLU(nn.Module):
    """leaky_relu(x + bias) through the bias_act op, the gain already folded into x and bias."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, act="lrelu", gain=1.0, impl=self.impl)


class _ResBlock(nn.Module):
    """ResBlock with its 1/sqrt(2) folded into the last layers of both branches (see
    _conv_layer), so one in-place add joins them."""

    def __init__(self, block: ResBlock, dtype: torch.dtype, conv_adds_bias: bool):
        super().__init__()
        self.conv1 = _conv_layer(block.conv1, dtype, conv_adds_bias)
        self.conv2 = _conv_layer(block.conv2, dtype, conv_adds_bias, out_scale=1 / math.sqrt(2))
        self.skip = _conv_layer(block.skip, dtype, conv_adds_bias, out_scale=1 / math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)).add_(self.skip(x))


class _ModulatedConv(nn.Module):
    """ModulatedConv2d safe in fp16: the style affine and the demodulation coefficients
    are computed in fp32 and only the convolution runs in the activation dtype.

    Demodulated layers are pre-normalised as in NVlabs' stylegan3: each output
    channel's weights to max |W| = 1/sqrt(fan_in), each sample's styles to max |s| = 1.
    Demodulation cancels both scales exactly, and every fp16 product W·s stays ≤ 1.

    fused: the modulated_conv2d op (per-sample weights); otherwise StyleGAN2's unfused
    form, :func:`~mmfs_fast.models.layers.shared_weight_conv`. The coefficients come from
    :func:`~mmfs_fast.ops.demodulation`, as in the training layer.

    upsample_form (unfused up=2 only): "transposed" (transposed conv, then the blur),
    "polyphase" (the blur folded into four phase convolutions, :func:`~mmfs_fast.ops.polyphase_up_weight`)
    or "auto" (winners.json's choice per shape on CUDA, see :meth:`_form`).
    """

    def __init__(self, layer: ModulatedConv2d, dtype: torch.dtype, fused: bool, upsample_form: str = "auto"):
        super().__init__()
        weight = (layer.weight[0] * layer.scale).detach().float()
        self.demodulate = layer.demodulate
        if self.demodulate:
            weight = weight * (layer.scale / weight.abs().amax(dim=(1, 2, 3), keepdim=True))
        self.register_buffer("weight", weight.to(dtype))
        # demodulation normalises exactly the weights the convolution applies
        self.register_buffer("weight_sq", weight_energy(self.weight))
        self.affine = _Linear(layer.modulation)
        self.up = 2 if layer.upsample else 1
        self.fused = fused
        if fused:
            # the op takes the unit-sum FIR; a device buffer keeps the call free of host→device copies
            fir = layer.blur.kernel / 4 if layer.upsample else default_fir(weight.device)
            self.register_buffer("fir", fir.detach().to(dtype))
        elif layer.upsample:
            # the layer's own blur after the transposed convolution (FIR ×4 and its pads)
            self.register_buffer("blur_kernel", layer.blur.kernel.detach().to(dtype))
            self.blur_pad = layer.blur.pad
            out_ch, in_ch, k, _ = weight.shape
            if upsample_form == "auto" and not _backend.polyphase_wins_somewhere(in_ch, out_ch):
                upsample_form = "transposed"
            if upsample_form != "transposed":
                self.register_buffer("weight_polyphase", polyphase_up_weight(weight, layer.blur.kernel).to(dtype))
                self.polyphase_pad = polyphase_up_pad(k, layer.blur.kernel.shape[0])
        self.upsample_form = upsample_form
        self.impl = layer.impl

    def _form(self, x: torch.Tensor) -> str:
        """The upsampling convolution's form for x: winners.json's per-shape choice on CUDA
        under "auto" (the shape is static within a captured graph), the training form elsewhere."""
        if self.upsample_form != "auto":
            return self.upsample_form
        if not x.is_cuda:
            return "transposed"
        return _backend.upsample_form(x.shape[1], self.weight.shape[0], x.shape[2])

    def undemodulated(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution's output before demodulation and the (B, O) fp32 demodulation
        coefficients (None for a layer without demodulation)."""
        styles = self.affine(w.float())
        demod = None
        if self.demodulate:
            styles = styles / styles.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            demod = demodulation(styles, self.weight_sq)
        if self.fused:
            out = modulated_conv2d(x, self.weight, styles.to(x.dtype), demodulate=False, up=self.up, fir=self.fir)
        elif self.up == 2 and self._form(x) == "polyphase":
            # x·s, then the four output phases as the channels of one convolution, interleaved
            x = x * styles.to(x.dtype)[:, :, None, None]
            out = F.pixel_shuffle(F.conv2d(x, self.weight_polyphase, padding=self.polyphase_pad), 2)
        else:
            up_blur = (self.blur_kernel, self.blur_pad) if self.up == 2 else None
            out = shared_weight_conv(x, styles, self.weight, up_blur, self.impl)
        return out, demod

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out, demod = self.undemodulated(x, w)
        return out if demod is None else out * demod.to(out.dtype)[:, :, None, None]


class _StyledConv(nn.Module):
    """StyledConv (modulated conv → noise → fused leaky ReLU) as the convolution and one
    epilogue pass, the styled_epilogue op: demodulation, bias, noise and leaky ReLU, with the
    activation's gain folded into the coefficients (lrelu(z)·g = lrelu(g·z) for g > 0)."""

    def __init__(self, layer: StyledConv, dtype: torch.dtype, fused: bool, upsample_form: str = "auto"):
        super().__init__()
        self.conv = _ModulatedConv(layer.conv, dtype, fused, upsample_form)
        gain = LRELU.default_gain
        # fp32 like the demodulation coefficients: the epilogue's arithmetic is fp32
        self.register_buffer("bias", (layer.activate.bias * gain).detach().float())
        self.noise_strength = layer.noise.weight.item() * gain  # a constant: the weights are frozen
        self.impl = "auto"

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out, demod = self.conv.undemodulated(x, w)  # StyledConv always demodulates
        # a model on a backend without this op's kernel runs it on "auto"
        impl = self.impl if self.impl in EPILOGUE_IMPLS else "auto"
        return styled_epilogue(out, demod * LRELU.default_gain, self.bias, noise, self.noise_strength, impl=impl)


def prepare_stylizer(stylizer: Stylizer, dtype: torch.dtype, impl: str, fused_modconv: bool = False,
                     conv_adds_bias: bool = True, upsample_form: str = "auto") -> Stylizer:
    """A frozen copy of ``stylizer`` for inference in ``dtype``: encoder and decoder
    activations in ``dtype``; mapping network, style affines and clip_mapper in fp32.
    fused_modconv: see :class:`_ModulatedConv`; conv_adds_bias: see :func:`_conv_layer`
    (the Engine's choice: True on the CPU, False on CUDA); upsample_form: see :class:`_ModulatedConv`."""
    if upsample_form not in ("auto", *_backend.UPSAMPLE_FORMS):
        raise ValueError(f"upsample_form must be 'auto' or one of {_backend.UPSAMPLE_FORMS}; got {upsample_form!r}")
    model = copy.deepcopy(stylizer).eval().requires_grad_(False)
    for name, child in model.named_children():
        child.to(dtype=dtype if name not in ("mapping_z", "clip_mapper") else torch.float32)
    # rebuilt from the caller's modules, so they read the weights before any cast
    replaced: list[str] = []
    for name, source in stylizer.named_modules():
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a module rebuilt as a whole
        if isinstance(source, EqualLinear):
            prepared = _Linear(source)
        elif isinstance(source, ConvLayer):
            prepared = _conv_layer(source, dtype, conv_adds_bias)
        elif isinstance(source, ResBlock):
            prepared = _ResBlock(source, dtype, conv_adds_bias)
        elif isinstance(source, StyledConv):
            prepared = _StyledConv(source, dtype, fused_modconv, upsample_form)
        elif isinstance(source, ModulatedConv2d):  # ToRGB's
            prepared = _ModulatedConv(source, dtype, fused_modconv)
        else:
            continue
        replaced.append(name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, prepared)
    model.set_impl(impl)
    return model
