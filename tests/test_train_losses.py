"""The training losses (train/losses.py) and each stage's totals (train/stages.py) against
their formulas in SPEC §6, recomputed in numpy: signs and weights included.

A stage's total is read where it is back-propagated: each test records the loss handed to
the stage's optimiser step, then replays the step's random draws (z, mixing, noise) with the
weights the step started from."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfs_fast.models import Discriminator
from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.losses import augment, discriminator_gan_loss, feature_l1, generator_gan_loss
from mmfs_fast.train.trainer import build_stage

SIZE, STYLE_DIM, BATCH = 128, 16, 2
TINY = dict(size=SIZE, ngf=4, style_dim=STYLE_DIM, n_mlp=2, d_base=8, batch_size=BATCH, impl="ref", workers=0,
            random_init=True, out_dir="unused", face_dir="unused", art_dir="unused")


def softplus(x):
    return np.log1p(np.exp(x))


def logits(seed=0):
    return torch.randn(6, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def images(seed, n=BATCH):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss functions --------------------------------------------------------------
def test_generator_gan_loss_is_non_saturating_softplus_of_minus_d():
    fake = logits(1)
    assert generator_gan_loss(fake).item() == pytest.approx(softplus(-fake.numpy()).mean(), rel=1e-12)


def test_discriminator_gan_loss_is_half_the_sum_of_both_softplus_terms():
    real, fake = logits(2), logits(3)
    expected = 0.5 * (softplus(fake.numpy()).mean() + softplus(-real.numpy()).mean())
    assert discriminator_gan_loss(real, fake).item() == pytest.approx(expected, rel=1e-12)


def tiny_discriminator():
    torch.manual_seed(0)
    return Discriminator(SIZE, base=2, impl="ref").double()


def test_feature_l1_sums_the_l1_of_each_feature_layer():
    D = tiny_discriminator()
    fake, target = images(4).double().requires_grad_(True), images(5).double().requires_grad_(True)
    with torch.no_grad():
        pairs = [(a.numpy(), b.numpy()) for a, b in zip(D(fake, features=True), D(target, features=True))]
    assert len(pairs) == 4
    loss = feature_l1(D, fake, target)
    assert loss.item() == pytest.approx(sum(np.abs(a - b).mean() for a, b in pairs), rel=1e-12)
    loss.backward()
    assert fake.grad.abs().sum() > 0 and target.grad is None  # the target is a fixed reference


def test_color_augmentation_is_brightness_saturation_contrast():
    x = images(6, n=3).double()
    torch.manual_seed(7)
    got = augment(x, ("color",))
    torch.manual_seed(7)  # the three per-image factors, drawn in this order
    brightness, saturation, contrast = (torch.rand(3, 1, 1, 1, dtype=torch.float64).numpy() for _ in range(3))
    y = x.numpy() + (brightness - 0.5)
    mean = y.mean(axis=1, keepdims=True)
    y = (y - mean) * (2 * saturation) + mean
    mean = y.mean(axis=(1, 2, 3), keepdims=True)
    y = (y - mean) * (contrast + 0.5) + mean
    np.testing.assert_allclose(got.numpy(), y, rtol=1e-12, atol=1e-12)


def test_config_weights_are_the_spec():
    cfg = TrainConfig(random_init=True)
    assert (cfg.feature_weight, cfg.structure_weight, cfg.r1_gamma, cfg.r1_every) == (4.0, 0.5, 10.0, 16)


# -- the stages' totals --------------------------------------------------------------
class TinyDINO:
    """Self-similarity of 16×16-pooled pixels: a frozen encoder numpy can recompute."""

    def self_similarity(self, x):
        tokens = F.normalize(F.avg_pool2d(x, 16).flatten(2).transpose(1, 2), dim=-1)
        return tokens @ tokens.transpose(1, 2)


def np_structure(fake, source):
    def similarity(x):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 16, 16, w // 16, 16).mean(axis=(3, 5)).reshape(b, c, -1).transpose(0, 2, 1)
        tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        return tokens @ tokens.transpose(0, 2, 1)

    return ((similarity(fake) - similarity(source)) ** 2).mean(axis=(1, 2)).sum()


class TinyCLIP:
    def __init__(self):
        self.weight = torch.randn(STYLE_DIM, 3 * 8 * 8, generator=torch.Generator().manual_seed(2))

    def encode_image(self, x):
        return F.normalize(F.linear(F.adaptive_avg_pool2d(x, 8).flatten(1), self.weight), dim=-1)


def record_optimizer_steps(stage) -> list:
    """(optimiser name, loss value, G and D before the step) of each optimiser step."""
    steps, step = [], stage.optimizer_step

    def recording(name, loss):
        steps.append((name, loss.item(), copy.deepcopy(stage.G), copy.deepcopy(stage.D)))
        step(name, loss)

    stage.optimizer_step = recording
    return steps


def run_step(stage, batch, step, seed=11):
    """The step's losses and recorded optimiser steps; the global RNG is left at the step's start."""
    steps = record_optimizer_steps(stage)
    torch.manual_seed(seed)
    terms = stage.train_step(batch, step)
    torch.manual_seed(seed)
    return terms, steps


def np_reconstruction(D, out, target, feature_weight=4.0):
    """L1(out, target) + feature_weight · Σ_layers L1 of D's features, in numpy."""
    with torch.no_grad():
        feats = [(a.numpy(), b.numpy()) for a, b in zip(D(out, features=True), D(target, features=True))]
    l1 = np.abs(out.numpy() - target.numpy()).mean()
    features = sum(np.abs(a - b).mean() for a, b in feats)
    return l1, features, l1 + feature_weight * features


def test_stage1_total_is_l1_plus_four_feature_l1():
    stage = build_stage(TrainConfig(stage=1, **TINY))
    terms, steps = run_step(stage, {}, 0)
    (name, loss, G, D), = steps
    with torch.no_grad():  # the step's draws, replayed: z, the teacher's noise, G's noise
        z = torch.randn(BATCH, STYLE_DIM)
        x = stage.teacher(z=z).clamp(-1, 1)
        out = G(x, z=z)
    l1, features, total = np_reconstruction(D, out, x)
    assert name == "G" and features > 0.01 * l1
    assert loss == pytest.approx(total, rel=1e-5)
    assert terms == pytest.approx({"l1": l1, "d_feature": features, "total": total}, rel=1e-5)


@pytest.mark.parametrize("step", [0, 1], ids=["with-r1", "without-r1"])
def test_stage2_losses_are_the_gan_terms_r1_and_structure(step):
    stage = build_stage(TrainConfig(stage=2, r1_every=2, **TINY), encoders={"dino": TinyDINO()})
    faces, art = images(8), images(9)
    terms, steps = run_step(stage, {"face_dir": faces, "art_dir": art}, step)
    assert [s[0] for s in steps] == (["D", "D", "G"] if step == 0 else ["D", "G"])
    G = steps[0][2]  # G is updated only in the last step
    with torch.no_grad():
        fake = G(faces, mixing=bool(torch.rand(()) < 0.5))
        d_loss = 0.5 * (softplus(steps[0][3](fake).numpy()).mean() + softplus(-steps[0][3](art).numpy()).mean())
    assert steps[0][1] == pytest.approx(d_loss, rel=1e-5) and terms["d_gan"] == pytest.approx(d_loss, rel=1e-5)
    if step == 0:  # lazy R1: γ/2 · E‖∇D(real)‖² · r1_every, on D after its GAN step
        D = steps[1][3].requires_grad_(False)
        real = art.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(real).sum(), real)
        r1 = grad.square().sum().item() / BATCH
        assert terms["r1"] == pytest.approx(r1, rel=1e-4)
        assert steps[1][1] == pytest.approx(10.0 / 2 * r1 * 2, rel=1e-4)  # γ = 10, r1_every = 2
    with torch.no_grad():
        fake = G(faces, mixing=bool(torch.rand(()) < 0.5))
        g_gan = softplus(-stage.D(fake).numpy()).mean()  # D after all of its steps
    structure = np_structure(fake.numpy(), faces.numpy())
    assert structure > 0.01 * g_gan
    assert steps[-1][1] == pytest.approx(g_gan + 0.5 * structure, rel=1e-5)
    assert terms["g_total"] == pytest.approx(g_gan + 0.5 * structure, rel=1e-5)
    assert (terms["g_gan"], terms["structure"]) == pytest.approx((g_gan, structure), rel=1e-5)


@pytest.mark.parametrize("encoder", ["tiny", "random-init CLIP"])
def test_stage3_total_is_l1_to_the_reference_plus_four_feature_l1(encoder):
    """With no ready-made encoder the stage builds CLIP from its config (random_init here)."""
    encoders = {"clip": TinyCLIP()} if encoder == "tiny" else {}
    style_dim = STYLE_DIM if encoders else 512  # the mapper takes CLIP's 512-wide embeddings
    stage = build_stage(TrainConfig(stage=3, **{**TINY, "style_dim": style_dim}), encoders=encoders)
    clip = stage.clip
    assert type(clip).__name__ == ("TinyCLIP" if encoders else "CLIPEncoder")
    faces = images(10)
    terms, steps = run_step(stage, {"face_dir": faces}, 0)
    (name, loss, G, D), = steps
    with torch.no_grad():  # G_ema is updated after the step, by the trainer
        reference = stage.G_ema(faces, mixing=bool(torch.rand(()) < 0.5))
        out = G(faces, clip_feats=clip.encode_image(reference))
    l1, features, total = np_reconstruction(D, out, reference)
    assert name == "G" and loss == pytest.approx(total, rel=1e-5)
    assert terms == pytest.approx({"l1": l1, "d_feature": features, "total": total}, rel=1e-5)


def test_stage2_builds_dino_from_its_config():
    from mmfs_fast.encoders import DINOEncoder

    stage = build_stage(TrainConfig(stage=2, **{**TINY, "size": 64, "ngf": 2, "d_base": 4}))
    assert isinstance(stage.dino, DINOEncoder) and not any(p.requires_grad for p in stage.dino.model.parameters())
