"""Stage IV losses against straightforward numpy / per-sample implementations (SPEC §6)."""
import numpy as np
import pytest
import torch

from mmfs_fast.losses import (directional_clip_loss, dino_structure_loss, projection_loss, structure_loss,
                              token_basis)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_directional_clip_loss_matches_formula():
    fake, src, prompt = rand(4, 512, seed=1), rand(4, 512, seed=2), rand(512, seed=3)
    expected = []
    for f, s in zip(fake.numpy(), src.numpy()):
        d = unit(f) - unit(s)
        p = prompt.numpy()
        expected.append(1 - d @ p / (np.linalg.norm(d) * np.linalg.norm(p)))
    got = directional_clip_loss(fake, src, prompt)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-12)
    # one direction per sample
    per_sample = rand(4, 512, seed=4)
    expected = [1 - np.dot(unit(f) - unit(s), p) / (np.linalg.norm(unit(f) - unit(s)) * np.linalg.norm(p))
                for f, s, p in zip(fake.numpy(), src.numpy(), per_sample.numpy())]
    assert directional_clip_loss(fake, src, per_sample).item() == pytest.approx(np.mean(expected), rel=1e-12)
    # along the prompt direction (at any embedding scale) → 0; against it → 2
    s, f = unit(src.numpy()), unit(fake.numpy())
    aligned = torch.from_numpy(f - s)
    assert directional_clip_loss(torch.from_numpy(2.5 * f), torch.from_numpy(0.7 * s), aligned).item() < 1e-12
    opposed = directional_clip_loss(torch.from_numpy(s), torch.from_numpy(f), aligned)
    assert opposed.item() == pytest.approx(2, rel=1e-12)


def cosine_matrix(keys):
    return np.array([[np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for b in keys] for a in keys])


def test_structure_loss_is_per_sample_sum_of_mse():
    keys_fake, keys_src = rand(3, 10, 6, seed=5), rand(3, 10, 6, seed=6)
    expected = sum(np.mean((cosine_matrix(f) - cosine_matrix(s)) ** 2)
                   for f, s in zip(keys_fake.numpy(), keys_src.numpy()))
    sim_fake = torch.tensor(np.stack([cosine_matrix(k) for k in keys_fake.numpy()]), requires_grad=True)
    sim_src = torch.tensor(np.stack([cosine_matrix(k) for k in keys_src.numpy()]), requires_grad=True)
    loss = structure_loss(sim_fake, sim_src)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert sim_src.grad is None  # the source is a fixed target
    torch.testing.assert_close(sim_fake.grad, 2 * (sim_fake - sim_src).detach() / 100)
    with pytest.raises(ValueError):
        structure_loss(sim_fake, sim_src[:2])


class KeysAsDINO:
    """Images whose 'keys' are their pixels: self_similarity is a cosine matrix we can recompute."""

    def self_similarity(self, x):
        k = torch.nn.functional.normalize(x.flatten(2).transpose(1, 2), dim=-1)
        return k @ k.transpose(1, 2)


def test_dino_structure_loss_computes_both_similarities():
    fake, src = rand(2, 3, 4, 4, seed=7).requires_grad_(True), rand(2, 3, 4, 4, seed=8)
    expected = sum(np.mean((cosine_matrix(f.reshape(3, -1).T) - cosine_matrix(s.reshape(3, -1).T)) ** 2)
                   for f, s in zip(fake.detach().numpy(), src.numpy()))
    loss = dino_structure_loss(KeysAsDINO(), fake, src)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert fake.grad.abs().sum() > 0


def test_projection_loss_matches_explicit_svd_projection():
    ref, fake = rand(49, 768, seed=9), rand(3, 49, 768, seed=10)
    t_ref = unit(ref.numpy()).T  # D × N
    u = np.linalg.svd(t_ref, full_matrices=False)[0]
    expected = np.mean([np.abs(u @ u.T @ unit(f).T - unit(f).T).mean() for f in fake.numpy()])
    basis = token_basis(ref)
    assert basis.shape == (768, 49)
    loss = projection_loss(fake.float(), basis.float())
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert projection_loss(fake, basis).item() == pytest.approx(expected, rel=1e-10)
    # the reference's own tokens, and any rescaling of them, lie in the span
    assert projection_loss(3 * ref[None], basis).item() < 1e-12
    # a batch of one reference is the same basis
    torch.testing.assert_close(token_basis(ref[None]).abs(), basis.abs())
    fake = fake.requires_grad_(True)
    projection_loss(fake, basis).backward()
    assert fake.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        projection_loss(fake[0], basis)
