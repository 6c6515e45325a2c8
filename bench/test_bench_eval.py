"""Evaluation metrics (issue 23): images per second through each metric network — the FID
Inception (pool3 features of 512² images, resized to 299²), the ArcFace iresnet-50 (crop +
112²) and LPIPS (AlexNet and VGG-16 at 512², one image pair per item) — and the Fréchet
distance of 2048-d statistics. Random weights (the speed does not depend on them); batch 32
on a GPU, 4 on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import DEVICE, ON_GPU
from mmfs_fast.evaluation import FIDInception, IResNet, LPIPS, frechet_distance, identity_distance

BATCH = 32 if ON_GPU else 4
SIZE = 512


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2 - 1


def _per_second(seconds: float, benchmark) -> None:
    benchmark.extra_info["images_per_s"] = BATCH / seconds


@torch.no_grad()
def test_inception_features(images, measure, benchmark):
    net = FIDInception().eval().to(DEVICE)
    _per_second(measure(lambda: net(images * 0.5 + 0.5), group="eval features", batch=BATCH, network="inception"),
                benchmark)


@torch.no_grad()
def test_arcface_distance(images, measure, benchmark):
    net = IResNet().eval().to(DEVICE)  # iresnet-50
    _per_second(measure(lambda: identity_distance(net, images, images.flip(0)), group="eval features", batch=BATCH,
                        network="arcface-r50"), benchmark)


@pytest.mark.parametrize("net", ["alex", "vgg"])
@torch.no_grad()
def test_lpips(net, images, measure, benchmark):
    model = LPIPS(net).eval().to(DEVICE)
    _per_second(measure(lambda: model(images, images.flip(0)), group="eval features", batch=BATCH,
                        network=f"lpips-{net}"), benchmark)


def test_frechet_distance_2048(measure):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 2048)), rng.normal(size=(3000, 2048)) + 0.1
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    measure(lambda: frechet_distance(*stats[0], *stats[1]), group="eval fid", rounds=2)
