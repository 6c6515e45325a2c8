"""Training losses (SPEC §6) and differentiable augmentation for the discriminator."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_l1(discriminator: nn.Module, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ over the discriminator's feature layers of L1(features(fake), features(target))."""
    with torch.no_grad():
        target_feats = discriminator(target, features=True)
    return sum(F.l1_loss(a, b) for a, b in zip(discriminator(fake, features=True), target_feats))


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating: softplus(−D(fake))."""
    return F.softplus(-fake_logits).mean()


def discriminator_gan_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½[softplus(D(fake)) + softplus(−D(real))]."""
    return 0.5 * (F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean())


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """E‖∇ₓD(x)‖² over real images, differentiable w.r.t. D's parameters (double backward)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


# -- differentiable augmentation (DiffAugment-style), same policy for real and fake --------
def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size, filling with zeros."""
    h, w = x.shape[2:]
    sh, sw = round(h * ratio), round(w * ratio)
    padded = F.pad(x, (sw, sw, sh, sh))
    shifts = torch.stack([torch.randint(0, 2 * sh + 1, (x.shape[0],)), torch.randint(0, 2 * sw + 1, (x.shape[0],))], 1)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of ``ratio`` × the image size at a random centre per image."""
    h, w = x.shape[2:]
    ch, cw = round(h * ratio), round(w * ratio)
    centres = torch.stack([torch.randint(0, h, (x.shape[0],)), torch.randint(0, w, (x.shape[0],))], 1)
    mask = torch.ones(x.shape[0], 1, h, w, device=x.device, dtype=x.dtype)
    for i, (cy, cx) in enumerate(centres.tolist()):
        mask[i, :, max(cy - ch // 2, 0):cy + ch - ch // 2, max(cx - cw // 2, 0):cx + cw - cw // 2] = 0
    return x * mask


AUGMENTATIONS = {"color": _color, "translation": _translation, "cutout": _cutout}


def augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """Apply the named augmentations in order; gradients flow through to ``x``."""
    for name in policy:
        x = AUGMENTATIONS[name](x)
    return x
