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

from mmfs_fast.encoders.attention import FusedSelfAttention, prenorm_step
from mmfs_fast.models.layers import (ConvLayer, EqualLinear, FusedLeakyReLU, ModulatedConv2d, ResBlock, StyledConv, ToRGB,
                                     style_slots)
from mmfs_fast.models.clip_mapper import CLIPMapper
from mmfs_fast.models.stylizer import N_CONVS, Stylizer
from mmfs_fast.ops import (_backend, bias_act, blur_folded_down_weight, demodulation, polyphase_up_pad,
                           polyphase_up_weight, stem_conv, styled_epilogue, upfirdn2d, weight_energy)
from mmfs_fast.ops.bias_act import ACTIVATIONS
from mmfs_fast.ops.stem_conv import MAX_IN_CHANNELS as STEM_MAX_IN_CHANNELS
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


def _conv_layer(layer: ConvLayer, dtype: torch.dtype, conv_adds_bias: bool, out_scale: float = 1.0,
                downsample_form: str = "auto", stem_form: str | None = None) -> nn.Module:
    """ConvLayer ([Blur] → EqualConv2d → [FusedLeakyReLU]) as the convolution (with its blur:
    :class:`_DownsampleConv`) → bias and leaky ReLU in one pass, its output times ``out_scale`` (> 0).
    stem_form: for the encoder's first layer (a stride-1 activated convolution of the RGB face),
    :class:`_StemConv` around that, in this form; None for every other layer.

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
    weight = (equal_conv.weight * (equal_conv.scale * gain)).detach()
    conv_bias = bias if conv_adds_bias else None
    if blurs:
        (blur,) = blurs
        conv = _DownsampleConv(blur, weight, conv_bias, equal_conv.stride, dtype, downsample_form)
    else:
        out_ch, in_ch, k, _ = weight.shape
        conv = nn.Conv2d(in_ch, out_ch, k, equal_conv.stride, equal_conv.padding, bias=conv_bias is not None,
                         device=weight.device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if conv_bias is not None:
                conv.bias.copy_(conv_bias)
    modules = [conv]
    if activation is not None:
        modules.append(nn.LeakyReLU(LRELU.default_alpha, inplace=True) if conv_adds_bias else _BiasLeakyReLU(bias))
    separate = nn.Sequential(*modules)
    if stem_form is None:
        return separate
    in_ch, k = weight.shape[1], weight.shape[-1]
    if (blurs or activation is None or equal_conv.stride != 1 or equal_conv.padding != k // 2
            or in_ch > STEM_MAX_IN_CHANNELS):
        raise ValueError(f"a stem is a stride-1, same-padded, activated convolution of at most "
                         f"{STEM_MAX_IN_CHANNELS} input channels; got {in_ch} → {weight.shape[0]}, {k}×{k}, "
                         f"stride {equal_conv.stride}, padding {equal_conv.padding}")
    return _StemConv(separate, bias, stem_form)


class _StemConv(nn.Module):
    """The encoder's first ConvLayer on the RGB face (see :func:`_conv_layer`) in one of its two
    forms: "separate" (the training form, ``separate``: the convolution, then its bias and leaky
    ReLU, in a pass of their own on CUDA) or "fused" (the stem_conv op: the convolution, bias and
    leaky ReLU in one pass, the output written once), or "auto" (see :func:`_form_for`)."""

    def __init__(self, separate: nn.Sequential, bias: torch.Tensor, form: str):
        super().__init__()
        self.separate = separate
        self.register_buffer("bias", bias.float())  # the op's, so no cast per call
        out_ch, in_ch = separate[0].weight.shape[:2]
        self.form = _settled_form("stem", form, in_ch, out_ch)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.separate[0]
        if _form_for("stem", self.form, x, conv.weight.shape[0]) == "fused":
            return stem_conv(x, conv.weight, self.bias, LRELU.default_alpha, impl=self.impl)
        return self.separate(x)


def _settled_form(kind: str, form: str, in_ch: int, out_ch: int) -> str:
    """``form`` of a ``kind`` convolution (_backend.CONV_FORMS), or the training form
    when it is "auto" and winners.json never picks the other at these channels: then only the
    training form's weights need preparing."""
    training, other = _backend.CONV_FORMS[kind]
    if form == "auto" and not _backend.form_wins_somewhere(kind, other, in_ch, out_ch):
        return training
    return form


def _form_for(kind: str, form: str, x: torch.Tensor, out_ch: int) -> str:
    """The form to run on x: the settled one, or under "auto" winners.json's per-shape choice on
    CUDA (the shape is static within a captured graph) and the training form elsewhere."""
    if form != "auto":
        return form
    if not x.is_cuda:
        return _backend.CONV_FORMS[kind][0]
    return _backend.conv_form(kind, x.shape[1], out_ch, x.shape[2])


class _DownsampleConv(nn.Module):
    """A downsampling ConvLayer's blur and strided convolution in one of its two exact forms:
    "blurred" (the training form: the FIR blur, then the strided convolution) or "folded" (the
    blur folded into one (k+3)×(k+3) strided kernel, :func:`~mmfs_fast.ops.blur_folded_down_weight`:
    4× the multiply-adds, one full-resolution pass less), or "auto" (see :func:`_form_for`)."""

    def __init__(self, blur: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                 dtype: torch.dtype, form: str):
        super().__init__()
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", bias)
        self.blur = copy.deepcopy(blur).to(dtype=dtype)
        self.stride = stride
        out_ch, in_ch = weight.shape[:2]
        self.form = _settled_form("downsample", form, in_ch, out_ch)
        if self.form != "blurred":
            pad0, pad1 = blur.pad
            assert pad0 == pad1, "a 3×3 downsampling convolution's blur pads are symmetric (blur_pads)"
            self.register_buffer("weight_folded", blur_folded_down_weight(weight, blur.kernel).to(dtype))
            self.folded_pad = pad0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _form_for("downsample", self.form, x, self.weight.shape[0]) == "folded":
            return F.conv2d(x, self.weight_folded, self.bias, stride=self.stride, padding=self.folded_pad)
        return F.conv2d(self.blur(x), self.weight, self.bias, stride=self.stride)


class _BiasLeakyReLU(nn.Module):
    """leaky_relu(x + bias) through the bias_act op, the gain already folded into x and bias."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, act="lrelu", gain=1.0, impl=self.impl)


def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 convolution of x (B, I, H, W) by weight (O, I), or (B, O, I) per sample, as one
    matrix product, added to ``accumulate`` ((B, O, H, W) in x's layout, a temporary of the
    caller's that is overwritten) in place: cuBLAS adds the output buffer it writes, where an
    out-of-place add (addmm, baddbmm) first copies the addend into a new one. The result has
    x's layout."""
    batch, channels, h, w = x.shape
    out_ch = weight.shape[-2]
    if x.is_contiguous(memory_format=torch.channels_last):
        # rows of (H·W, I) @ (I, O): the (B, H, W, O) result is the channels-last tensor
        rows = x.permute(0, 2, 3, 1).reshape(batch, h * w, channels)
        if weight.ndim == 2:  # one weight for the batch: one GEMM over every pixel of every sample
            rows, weight = rows.reshape(-1, channels), weight.T
            out = (rows @ weight if accumulate is None
                   else accumulate.permute(0, 2, 3, 1).reshape(-1, out_ch).addmm_(rows, weight))
        else:
            weight = weight.transpose(1, 2)
            out = (torch.bmm(rows, weight) if accumulate is None
                   else accumulate.permute(0, 2, 3, 1).reshape(batch, h * w, out_ch).baddbmm_(rows, weight))
        return out.reshape(batch, h, w, out_ch).permute(0, 3, 1, 2)
    weight, columns = weight.expand(batch, out_ch, channels), x.reshape(batch, channels, h * w)
    out = (torch.bmm(weight, columns) if accumulate is None
           else accumulate.reshape(batch, out_ch, h * w).baddbmm_(weight, columns))
    return out.reshape(batch, out_ch, h, w)


class _Skip(nn.Module):
    """ResBlock's skip branch (blur, then a stride-2 1×1 convolution without bias) and the join
    with the main branch: the blur keeps only the samples the strided convolution reads
    (upfirdn2d with down=2 writes a quarter of the full blur), and the convolution is one matrix
    product that accumulates into the main branch's output (see _pointwise_conv)."""

    def __init__(self, layer: ConvLayer, dtype: torch.dtype, out_scale: float):
        super().__init__()
        blur, equal_conv = layer
        self.register_buffer("kernel", blur.kernel.detach().to(dtype))
        self.pad = blur.pad
        weight = equal_conv.weight[:, :, 0, 0] * (equal_conv.scale * out_scale)
        self.register_buffer("weight", weight.detach().to(dtype))
        self.impl = "auto"

    def forward(self, x: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        return _pointwise_conv(upfirdn2d(x, self.kernel, down=2, pad=self.pad, impl=self.impl), self.weight, main)


class _ResBlock(nn.Module):
    """ResBlock with its 1/sqrt(2) folded into the last layers of both branches (see
    _conv_layer), so the skip's matrix product joins them (see _Skip)."""

    def __init__(self, block: ResBlock, dtype: torch.dtype, conv_adds_bias: bool, downsample_form: str = "auto"):
        super().__init__()
        self.conv1 = _conv_layer(block.conv1, dtype, conv_adds_bias)
        self.conv2 = _conv_layer(block.conv2, dtype, conv_adds_bias, 1 / math.sqrt(2), downsample_form)
        self.skip = _Skip(block.skip, dtype, out_scale=1 / math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x, self.conv2(self.conv1(x)))


class _ModulatedConv(nn.Module):
    """ModulatedConv2d's convolution for inference, on an input its producer has already scaled
    by the layer's styles (x·s: the previous epilogue writes it, see :class:`_Synthesis`); the
    styles and demodulation coefficients come from the :class:`_StyleTable`.

    Demodulated layers are pre-normalised as in NVlabs' stylegan3: each output channel's weights
    to max |W| = 1/sqrt(fan_in) here, each sample's styles to max |s| = 1 in the table.
    Demodulation cancels both scales exactly, and every fp16 product stays ≤ 1. gain (> 0): the
    weights also carry the next activation's gain (lrelu(z)·g = lrelu(g·z)); :meth:`energy` is
    that of the weights without it, so demodulation keeps it.

    upsample_form (up=2 only): "transposed" (the transposed convolution; its blur is left to the
    epilogue, :attr:`blur`), "polyphase" (the blur folded into four phase convolutions,
    :func:`~mmfs_fast.ops.polyphase_up_weight`) or "auto" (winners.json's choice per shape on
    CUDA, see :func:`_form_for`).
    """

    def __init__(self, layer: ModulatedConv2d, dtype: torch.dtype, upsample_form: str = "auto", gain: float = 1.0):
        super().__init__()
        weight = (layer.weight[0] * layer.scale).detach().float()
        self.demodulate = layer.demodulate
        if self.demodulate:
            weight = weight * (layer.scale / weight.abs().amax(dim=(1, 2, 3), keepdim=True))
        weight = weight * gain
        self.gain = gain
        self.register_buffer("weight", weight.to(dtype))
        self.up = 2 if layer.upsample else 1
        if layer.upsample:
            # the layer's own blur after the transposed convolution (FIR ×4 and its symmetric pad)
            self.register_buffer("blur", layer.blur.kernel.detach().to(dtype))
            pad0, pad1 = layer.blur.pad
            assert pad0 == pad1, "the decoder's blur pads are symmetric (blur_pads with a 3×3 kernel)"
            self.blur_pad = pad0
            out_ch, in_ch, k, _ = weight.shape
            upsample_form = _settled_form("upsample", upsample_form, in_ch, out_ch)
            if upsample_form != "transposed":
                self.register_buffer("weight_polyphase", polyphase_up_weight(weight, layer.blur.kernel).to(dtype))
                self.polyphase_pad = polyphase_up_pad(k, layer.blur.kernel.shape[0])
        self.upsample_form = upsample_form

    def energy(self) -> torch.Tensor:
        """(O, I) Σ_taps W² of exactly the weights the convolution applies, without the gain: what
        demodulation normalises."""
        return weight_energy(self.weight) / self.gain ** 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution of x (already scaled by the styles), before demodulation, and the FIR
        blur still to apply to it (None when there is none)."""
        if self.up == 1:
            return F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2), None
        if _form_for("upsample", self.upsample_form, x, self.weight.shape[0]) == "polyphase":
            # the four output phases as the channels of one convolution, interleaved
            return F.pixel_shuffle(F.conv2d(x, self.weight_polyphase, padding=self.polyphase_pad), 2), None
        return F.conv_transpose2d(x, self.weight.transpose(0, 1), stride=2), self.blur


class _StyledConv(nn.Module):
    """StyledConv (modulated conv → noise → fused leaky ReLU) as the convolution and one
    epilogue pass, the styled_epilogue op: the blur of a transposed convolution, demodulation,
    bias, noise, leaky ReLU and, when given, the next convolution's styles, with the activation's
    gain folded into the weights, bias and noise strength (lrelu(z)·g = lrelu(g·z) for g > 0)."""

    def __init__(self, layer: StyledConv, dtype: torch.dtype, upsample_form: str = "auto"):
        super().__init__()
        gain = LRELU.default_gain
        self.conv = _ModulatedConv(layer.conv, dtype, upsample_form, gain)
        # fp32 like the demodulation coefficients: the epilogue's arithmetic is fp32
        self.register_buffer("bias", (layer.activate.bias * gain).detach().float())
        self.noise_strength = layer.noise.weight.item() * gain  # a constant: the weights are frozen
        self.impl = "auto"

    def forward(self, x: torch.Tensor, demod: torch.Tensor, noise: torch.Tensor | None,
                next_styles: torch.Tensor | None = None,
                keep_unscaled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x already scaled by this layer's styles; demod (B, O) its demodulation coefficients;
        next_styles (B, O): scale the result for the next convolution. Returns the result and,
        with keep_unscaled (a ToRGB reads the output too), the output before that scaling,
        written by the same pass; else None."""
        out, blur = self.conv(x)
        # the epilogue's result has out's shape and layout when there is no blur
        unscaled = torch.empty_like(out) if keep_unscaled else None
        # a model on a backend without this op's kernel runs it on "auto"
        impl = self.impl if self.impl in EPILOGUE_IMPLS else "auto"
        result = styled_epilogue(out, demod, self.bias, noise, self.noise_strength, next_styles, blur,
                                 self.conv.blur_pad if blur is not None else 0, unscaled, impl=impl)
        return result, unscaled


class _ToRGB(nn.Module):
    """ToRGB (1×1 modulated conv to 3 channels, no demodulation, bias, upsampled skip) as one
    batched matrix product with per-sample weights W·s (from the style table), so its input is
    read once and never scaled, accumulated into the upsampled skip. Its bias is not added here:
    :class:`_Synthesis` adds all ToRGB biases at once."""

    def __init__(self, layer: ToRGB, dtype: torch.dtype):
        super().__init__()
        if hasattr(layer, "upsample"):
            self.upsample = copy.deepcopy(layer.upsample).to(dtype=dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """x (B, C, H, W); weight (B, 3, C) = W·s per sample; skip: the previous RGB or None."""
        return _pointwise_conv(x, weight, None if skip is None else self.upsample(skip))


@torch.no_grad()
def _rgb_bias_image(layers: list[ToRGB], first_size: int) -> torch.Tensor:
    """The ToRGB biases' share of the output, (1, 3, S, S) in fp32: each ToRGB adds its bias to
    the upsampled RGB of the one before, and upsampling is linear, so the biases add up to one
    constant image (the upsampling's border taps included) that the output gets once."""
    image = layers[0].bias.detach().float().expand(1, 3, first_size, first_size)
    for layer in layers[1:]:
        image = copy.deepcopy(layer.upsample).float()(image) + layer.bias.detach().float()
    return image


class _StyleTable(nn.Module):
    """Every modulated layer's styles, demodulation coefficients and ToRGB per-sample weights from
    w+ at once: they depend on w+ only, so a few batched kernels replace a chain of small ones per
    layer. The layers' affines and weight energies are stacked, zero-padded to the widest layer
    (padded styles are 0 and change no maximum or sum).

    The demodulated layers' styles are normalised to max |s| = 1 per sample (see
    :class:`_ModulatedConv`); ToRGB's weights W·s take its styles as they are.

    layers: the training layers in synthesis order; energies: the :meth:`_ModulatedConv.energy`
    of each demodulated one (None for ToRGB's); slots: the w+ slot of each."""

    def __init__(self, layers: list[ModulatedConv2d], energies: list[torch.Tensor | None], slots: list[int]):
        super().__init__()
        self.in_channels = [layer.weight.shape[2] for layer in layers]
        self.out_channels = [layer.weight.shape[1] for layer in layers]
        count, widest_in, widest_out = len(layers), max(self.in_channels), max(self.out_channels)
        dim = layers[0].modulation.weight.shape[1]
        affine_weight, affine_bias = torch.zeros(count, widest_in, dim), torch.zeros(count, 1, widest_in)
        padded_energy = torch.zeros(count, widest_out, widest_in)
        self.rgb_rows = [n for n, layer in enumerate(layers) if not layer.demodulate]
        # every third row from the first ToRGB's (synthesis order): a strided view, not a gather
        self.rgb_slice = slice(self.rgb_rows[0] if self.rgb_rows else count, None, 3)
        if list(range(count))[self.rgb_slice] != self.rgb_rows:
            raise ValueError(f"the ToRGB layers must be every third from the second, got rows {self.rgb_rows}")
        rgb_weight = torch.zeros(len(self.rgb_rows), 3, widest_in)
        for n, (layer, energy) in enumerate(zip(layers, energies)):
            i, o = self.in_channels[n], self.out_channels[n]
            affine = _Linear(layer.modulation)
            affine_weight[n, :i], affine_bias[n, 0, :i] = affine.weight.cpu(), affine.bias.cpu()
            if layer.demodulate:
                padded_energy[n, :o, :i] = energy.cpu()
            else:
                rgb_weight[self.rgb_rows.index(n), :, :i] = (layer.weight[0, :, :, 0, 0] * layer.scale).detach().cpu()
        device = layers[0].weight.device
        for name, value in (("slots", torch.tensor(slots, dtype=torch.long)), ("affine_weight", affine_weight),
                            ("affine_bias", affine_bias), ("energy", padded_energy),
                            ("rgb_weight", rgb_weight)):
            self.register_buffer(name, value.to(device))

    def forward(self, w_plus: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, n_latent, D) w+ → the normalised styles (L, B, I) and demod (L, B, O) in fp32 (the
        ToRGB rows unused), and the ToRGB weights (R, B, 3, I) in ``dtype`` (the activations'),
        computed in fp32; layer n's own are the first in_channels[n] / out_channels[n]."""
        w = w_plus.float().transpose(0, 1)[self.slots]
        styles = torch.baddbmm(self.affine_bias, w, self.affine_weight.transpose(1, 2))
        picked = styles[self.rgb_slice][:, :, None, :]  # ToRGB's, before the normalisation
        rgb = torch.mul(picked, self.rgb_weight[:, None], out=picked.new_empty(
            (len(self.rgb_rows), w_plus.shape[0], *self.rgb_weight.shape[1:]), dtype=dtype))
        # every row normalised, ToRGB's too (then unused): no mask to apply
        styles = styles / torch.linalg.vector_norm(styles, float("inf"), dim=2, keepdim=True).clamp_min_(1e-30)
        return styles, demodulation(styles, self.energy), rgb


class _Synthesis(nn.Module):
    """The decoder's synthesis pass (:func:`~mmfs_fast.models.layers.synthesize`) in inference
    form: all styles first (:attr:`table`, a module of its own so that a caller can compute them
    beside the encoder), then per styled layer its convolution and one
    epilogue pass, which writes the output already scaled by the next convolution's styles and,
    where a ToRGB reads it too, also unscaled. Only the encoder's features get a pass of their
    own for the first convolution's x·s.

    layers: the training layers in synthesis order (first conv, first ToRGB, then upsampling
    conv, conv and ToRGB per block)."""

    def __init__(self, layers: list[StyledConv | ToRGB], dtype: torch.dtype, upsample_form: str, size: int):
        super().__init__()
        prepared = [_StyledConv(m, dtype, upsample_form) if isinstance(m, StyledConv) else _ToRGB(m, dtype)
                    for m in layers]
        self.first_conv, self.first_rgb = prepared[:2]
        self.blocks = nn.ModuleList(nn.ModuleList(prepared[i:i + 3]) for i in range(2, len(prepared), 3))
        self.table = _StyleTable([m.conv for m in layers],
                                 [p.conv.energy() if isinstance(p, _StyledConv) else None for p in prepared],
                                 style_slots(len(self.blocks)))
        rgbs = [m for m in layers if isinstance(m, ToRGB)]
        self.register_buffer("rgb_bias", _rgb_bias_image(rgbs, size >> len(self.blocks)).to(dtype))

    def forward(self, feat: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                noises: list[torch.Tensor | None]) -> torch.Tensor:
        """The image from the encoder's features and ``table`` (:class:`_StyleTable`'s output
        for w+ in the features' dtype)."""
        styles, demod, rgb_weights = table
        ins, outs = self.table.in_channels, self.table.out_channels
        conv_noises = iter(noises)

        def styled(layer, row, x, next_row=None, keep_unscaled=False):
            """Layer ``row`` of the table on x, scaled for the layer of ``next_row`` (None: the last)."""
            next_styles = None if next_row is None else styles[next_row, :, :ins[next_row]]
            return layer(x, demod[row, :, :outs[row]], next(conv_noises), next_styles, keep_unscaled)

        # fp32 styles, an fp16/bf16 product in one pass
        x = torch.mul(feat, styles[0, :, :ins[0], None, None], out=torch.empty_like(feat))
        x, y = styled(self.first_conv, 0, x, 2, keep_unscaled=True)  # read by block 1 and the first ToRGB
        rgb = self.first_rgb(y, rgb_weights[0, :, :, :ins[1]], None)
        for n, (conv_up, conv, to_rgb) in enumerate(self.blocks):
            up, same, colour = 3 * n + 2, 3 * n + 3, 3 * n + 4  # their rows in the table
            x, _ = styled(conv_up, up, x, same)
            if n + 1 < len(self.blocks):  # the next block's upsampling conv and this ToRGB read the output
                x, y = styled(conv, same, x, colour + 1, keep_unscaled=True)
            else:
                y, _ = styled(conv, same, x)
            rgb = to_rgb(y, rgb_weights[n + 1, :, :, :ins[colour]], rgb)
        # in fp32, the dtype every caller returns: the pass that adds the biases is the cast too
        return torch.add(rgb, self.rgb_bias, out=torch.empty_like(rgb, dtype=torch.float32))


class _MapperLayer(nn.Module):
    """nn.TransformerEncoderLayer (pre-norm, ReLU), evaluated, on batch-first tokens: the
    attention one fused kernel, each residual add joined to the LayerNorm that reads the sum
    (:func:`~mmfs_fast.encoders.attention.prenorm_step`), and the ReLU in its GEMM's epilogue
    (cuBLASLt's, beside the bias)."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        if not layer.norm_first or layer.activation is not F.relu:
            raise ValueError("_MapperLayer covers the CLIP mapper's pre-norm ReLU encoder layers")
        self.norm1, self.norm2, self.linear1, self.linear2 = layer.norm1, layer.norm2, layer.linear1, layer.linear2
        self.self_attn = FusedSelfAttention(layer.self_attn, causal=False, batch_first=True)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch._addmm_activation(self.linear1.bias, x.reshape(-1, x.shape[-1]), self.linear1.weight.T)
        return F.linear(hidden, self.linear2.weight, self.linear2.bias).view(*x.shape[:-1], -1)

    def step(self, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return prenorm_step(x, pending, self.norm1, lambda h: self.self_attn(h, h, h)[0], self.norm2,
                            self._feed_forward)


class _CLIPMapper(nn.Module):
    """CLIPMapper for inference: its transformer on batch-first tokens (B, slots, D), which is
    the w+ layout, so no transposes; each layer a :class:`_MapperLayer`, whose feed-forward
    output the next layer's first LayerNorm adds. Takes CLIP's embeddings in CLIP's dtype and
    normalises them in fp32 (the division is the cast)."""

    def __init__(self, mapper: CLIPMapper):
        super().__init__()
        self.position_embedding = mapper.position_embedding
        self.layers = nn.ModuleList(_MapperLayer(layer) for layer in mapper.transformer.layers)

    def forward(self, clip_feats: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(clip_feats, dim=-1, keepdim=True, dtype=torch.float32)
        tokens = (clip_feats / norm.clamp_min_(1e-12))[:, None] + self.position_embedding  # F.normalize's eps
        pending = None
        for layer in self.layers:
            tokens, pending = layer.step(tokens, pending)
        return F.leaky_relu(tokens + pending, 0.2)


class InferenceStylizer(Stylizer):
    """A Stylizer in inference form (made by :func:`prepare_stylizer`): the encoder, mapping and
    clip_mapper prepared in place (the clip_mapper as :class:`_CLIPMapper`), and the decoder as
    :attr:`synthesis`."""

    synthesis: _Synthesis

    def _param(self) -> torch.Tensor:
        return self.synthesis.first_conv.conv.weight

    def synthesize(self, feat: torch.Tensor, w_plus: torch.Tensor,
                   noises: list[torch.Tensor | None] | None) -> torch.Tensor:
        return self.render(feat, self.style_table(w_plus), noises)

    def style_table(self, w_plus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer's styles from w+ (:class:`_StyleTable`): they depend on w+ only, so they can
        be computed apart from (and beside) the encoder."""
        return self.synthesis.table(w_plus, self._param().dtype)

    def render(self, feat: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               noises: list[torch.Tensor | None] | None) -> torch.Tensor:
        return self.synthesis(feat, table, noises or [None] * N_CONVS)


def prepare_stylizer(stylizer: Stylizer, dtype: torch.dtype, impl: str, conv_adds_bias: bool = True,
                     upsample_form: str = "auto", downsample_form: str = "auto",
                     stem_form: str = "auto") -> InferenceStylizer:
    """A frozen copy of ``stylizer`` for inference in ``dtype``: encoder and decoder
    activations in ``dtype``; mapping network, styles and clip_mapper in fp32.
    conv_adds_bias: see :func:`_conv_layer` (the Engine's choice: True on the CPU, False on
    CUDA); upsample_form: see :class:`_ModulatedConv`; downsample_form: see :class:`_DownsampleConv`;
    stem_form: see :class:`_StemConv`."""
    for kind, form in (("upsample", upsample_form), ("downsample", downsample_form), ("stem", stem_form)):
        if form not in ("auto", *_backend.CONV_FORMS[kind]):
            raise ValueError(f"{kind}_form must be 'auto' or one of {_backend.CONV_FORMS[kind]}; got {form!r}")
    model = copy.deepcopy(stylizer).eval().requires_grad_(False)
    decoder = stylizer.decoder_layer_names()
    for name in decoder:
        delattr(model, name)  # rebuilt below as one synthesis module
    for name, child in model.named_children():
        child.to(dtype=dtype if name not in ("mapping_z", "clip_mapper") else torch.float32)
    # rebuilt from the caller's modules, so they read the weights before any cast
    replaced: list[str] = list(decoder)
    for name, source in stylizer.named_modules():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a module rebuilt as a whole
        if isinstance(source, EqualLinear):
            prepared = _Linear(source)
        elif isinstance(source, ConvLayer):
            prepared = _conv_layer(source, dtype, conv_adds_bias,
                                   stem_form=stem_form if source is stylizer.encoder[0] else None)
        elif isinstance(source, ResBlock):
            prepared = _ResBlock(source, dtype, conv_adds_bias, downsample_form)
        else:
            continue
        replaced.append(name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, prepared)
    if model.clip_mapper is not None:
        model.clip_mapper = _CLIPMapper(model.clip_mapper)
    model.__class__ = InferenceStylizer  # the same modules and state, with a synthesis pass of its own
    model.synthesis = _Synthesis([getattr(stylizer, name) for name in decoder], dtype, upsample_form,
                                 stylizer.config.size)
    model.set_impl(impl)
    return model
