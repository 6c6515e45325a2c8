"""LPIPS (v0.1): learned perceptual distance on AlexNet or VGG-16 features.

Two local files: the linear heads the ``lpips`` package ships (``lpips/weights/v0.1/alex.pth``
or ``vgg.pth``; the network is recognised from their widths) and the ImageNet backbone in
torchvision's layout (``features.N.*`` keys; the classifier is ignored). The backbones are
defined here with torchvision's layer indices, so torchvision itself is not needed.
"""
from __future__ import annotations

import torch
from torch import nn

from mmfs_fast.evaluation.weights import MetricWeightsError, load_into, load_state_dict

HEADS_HOW_TO_GET = ("Use the linear-layer weights of the lpips package (pip install lpips; the files "
                    "lpips/weights/v0.1/alex.pth or vgg.pth inside it, also in github.com/richzhang/"
                    "PerceptualSimilarity).")
BACKBONE_HOW_TO_GET = ("Use torchvision's ImageNet weights: alexnet-owt-7be5be79.pth (for alex.pth heads) or "
                       "vgg16-397923af.pth (for vgg.pth heads), from https://download.pytorch.org/models/ "
                       "(torchvision caches them in ~/.cache/torch/hub/checkpoints/).")
# per backbone: its layers as (kind, in, out, kernel, stride, padding) in torchvision's order, and
# the indices of the ReLUs whose outputs LPIPS compares
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]
_VGG16 = []
for _cin, _cout, _convs in ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)):
    if _VGG16:
        _VGG16.append(("vgg_pool",))
    for _i in range(_convs):
        _VGG16 += [("conv", _cin if _i == 0 else _cout, _cout, 3, 1, 1), ("relu",)]
BACKBONES = {"alex": (_ALEX, (1, 4, 7, 9, 11)), "vgg": (_VGG16, (3, 8, 15, 22, 29))}
# the lpips package's input scaling (ImageNet statistics for inputs in [-1, 1])
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def _layer(spec) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, cin, cout, kernel, stride, padding = spec
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    if kind == "relu":
        return nn.ReLU()
    return nn.MaxPool2d(3, stride=2) if kind == "pool" else nn.MaxPool2d(2, stride=2)


def tap_channels(net: str) -> tuple[int, ...]:
    layers, taps = BACKBONES[net]
    return tuple(next(s[2] for s in reversed(layers[:t]) if s[0] == "conv") for t in taps)


class LPIPS(nn.Module):
    """``lpips(x0, x1)``: (B,) distances between (B, 3, H, W) images in [-1, 1]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"net must be one of {tuple(BACKBONES)}, got {net!r}")
        layers, self.taps = BACKBONES[net]
        self.net = net
        self.features = nn.Sequential(*(_layer(s) for s in layers[:self.taps[-1] + 1]))
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels(net))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_files(cls, heads_path, backbone_path) -> "LPIPS":
        heads = load_state_dict(heads_path, "LPIPS linear layers", HEADS_HOW_TO_GET)
        widths = tuple(heads[f"lin{i}.model.1.weight"].shape[1] if f"lin{i}.model.1.weight" in heads else None
                       for i in range(5))
        net = next((n for n in BACKBONES if tap_channels(n) == widths), None)
        if net is None:
            raise MetricWeightsError(f"{heads_path}: not LPIPS v0.1 alex/vgg linear layers (lin0-4 widths "
                                     f"{widths}). {HEADS_HOW_TO_GET}")
        model = cls(net)
        backbone = load_state_dict(backbone_path, f"LPIPS {net} backbone", BACKBONE_HOW_TO_GET)
        state = {f"heads.{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(5)}
        state.update(backbone)
        load_into(model, state, backbone_path, f"LPIPS {net} backbone", BACKBONE_HOW_TO_GET,
                  ignore=("classifier.",))  # ImageNet's head: LPIPS compares features only
        return model.eval().requires_grad_(False)

    def tapped_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) activations at the taps."""
        out, x = [], (x - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        dtype = self.shift.dtype
        f0 = self.tapped_features(x0.to(self.shift.device, dtype))
        f1 = self.tapped_features(x1.to(self.shift.device, dtype))
        return sum(head((a - b).square()).mean(dim=(1, 2, 3)) for head, a, b in zip(self.heads, f0, f1)).float()
