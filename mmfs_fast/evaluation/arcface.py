"""ArcFace identity embeddings: an iresnet in the layout insightface's arcface_torch publishes.

arcface_torch's ``backbone.pth`` files (e.g. ms1mv3_arcface_r50_fp16, glint360k_cosface_r100)
are bare state dicts of ``IResNet``; the depth (r18/34/50/100/200) and widths are read from
the file. Inputs are 112² RGB in [-1, 1]. FFHQ-aligned faces are cropped first to the box
that pSp's identity loss takes from a 256² FFHQ face, rows 35–223 and columns 32–220, which
puts the face where ArcFace's five-point alignment does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.evaluation.weights import MetricWeightsError, load_into, load_state_dict

INPUT_SIZE = 112
FFHQ_CROP = (35 / 256, 223 / 256, 32 / 256, 220 / 256)  # top, bottom, left, right
HOW_TO_GET = ("Use an arcface_torch backbone.pth from insightface (github.com/deepinsight/insightface, "
              "recognition/arcface_torch, model zoo: e.g. ms1mv3_arcface_r100_fp16/backbone.pth or r50).")


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """(B, 3, 112, 112) in [-1, 1] → (B, num_features) embeddings (not normalised)."""

    def __init__(self, layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for index, (blocks, width) in enumerate(zip(layers, widths), start=1):
            stage = [IBasicBlock(cin, width, 2)] + [IBasicBlock(width, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            cin = width
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        spatial = INPUT_SIZE // 2 ** len(layers)
        self.fc = nn.Linear(cin * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    @classmethod
    def from_state_dict(cls, state: dict, path="<state dict>") -> "IResNet":
        """An IResNet shaped like ``state`` (block counts and widths read from its keys)."""
        try:
            layers = tuple(1 + max(int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k)))
                           for i in range(1, 5))
            widths = tuple(state[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5))
            num_features = state["fc.weight"].shape[0]
        except (ValueError, KeyError) as e:
            raise MetricWeightsError(f"{path}: not an arcface_torch iresnet state dict (no {e}). {HOW_TO_GET}") \
                from e
        model = cls(layers, widths, num_features)
        load_into(model, state, path, "ArcFace iresnet", HOW_TO_GET)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path) -> "IResNet":
        return cls.from_state_dict(load_state_dict(path, "ArcFace iresnet", HOW_TO_GET), path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def crop_ffhq_face(x: torch.Tensor) -> torch.Tensor:
    """FFHQ-aligned (B, 3, S, S) faces in [-1, 1] → ArcFace's (B, 3, 112, 112) framing."""
    size = x.shape[-1]
    top, bottom, left, right = (round(f * size) for f in FFHQ_CROP)
    x = x[:, :, top:bottom, left:right].float()
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)


def identity_embedding(network: nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 embeddings of FFHQ-aligned faces in [-1, 1]."""
    param = next(network.parameters())
    x = crop_ffhq_face(faces.to(param.device)).to(param.dtype)
    return F.normalize(network(x).float(), dim=1)


def identity_distance(network: nn.Module, faces: torch.Tensor, stylized: torch.Tensor) -> torch.Tensor:
    """(B,) ArcFace distance 1 − cos(embedding(face), embedding(stylized face))."""
    return 1 - (identity_embedding(network, faces) * identity_embedding(network, stylized)).sum(1)
