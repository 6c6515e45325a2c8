"""Training stages I-III on tiny models (128², ngf 4) and generated images, CPU, ref ops."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfs_fast.models import CheckpointError, Discriminator, Generator, Stylizer
from mmfs_fast.atomic import save_torch as atomic_save
from mmfs_fast.train import cli
from mmfs_fast.train.config import TrainConfig, make_config
from mmfs_fast.train.data import ImageFolder, StepSampler
from mmfs_fast.train.losses import augment, r1_penalty
from mmfs_fast.train.state import read_stage_checkpoint
from mmfs_fast.train.trainer import build_stage, train

SIZE, STYLE_DIM = 128, 32
TINY = dict(size=SIZE, ngf=4, style_dim=STYLE_DIM, n_mlp=2, d_base=8, batch_size=2, impl="ref", workers=0,
            sample_every=2, checkpoint_every=1000)
TRAINED = {1: ("encoder.", "decoder0.", "to_rgb0."), 2: ("",), 3: ("clip_mapper.",)}


class TinyDINO:
    """Stands in for DINOEncoder: cosine self-similarity of frozen random patch features."""

    def __init__(self):
        self.weight = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def self_similarity(self, x):
        tokens = F.normalize(F.conv2d(x, self.weight, stride=16).flatten(2).transpose(1, 2), dim=-1)
        return tokens @ tokens.transpose(1, 2)


class TinyCLIP:
    """Stands in for CLIPEncoder: a frozen random projection to L2-normalised embeddings."""

    def __init__(self):
        self.weight = torch.randn(STYLE_DIM, 3 * 8 * 8, generator=torch.Generator().manual_seed(2))

    def encode_image(self, x):
        return F.normalize(F.linear(F.adaptive_avg_pool2d(x, 8).flatten(1), self.weight), dim=-1)


ENCODERS = {"dino": TinyDINO(), "clip": TinyCLIP()}


def _smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        folder = root / "faces" / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        _smooth_image(rng, 150, 140).save(folder / f"face{i}.png")
    _smooth_image(rng, 16, 16).save(root / "faces" / "tiny.png")
    (root / "faces" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "faces" / "notes.txt").write_text("ignored: not an image suffix")
    (root / "art").mkdir()
    for i in range(4):
        _smooth_image(rng, 128, 128).save(root / "art" / f"art{i}.jpg")
    return root / "faces", root / "art"


def config(**settings) -> TrainConfig:
    return TrainConfig(**{**TINY, **settings})


def run_quietly(cfg: TrainConfig) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipping")
        return torch.load(train(cfg, ENCODERS), weights_only=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, image_dirs):
    """Stage I from a (random) StyleGAN2 checkpoint, then II and III, each from the previous one."""
    root = tmp_path_factory.mktemp("chain")
    faces, art = image_dirs
    torch.manual_seed(3)
    teacher = {"g_ema": Generator(SIZE, STYLE_DIM, 2, channel_base=4 * SIZE, channel_max=32).state_dict(),
               "d": Discriminator(SIZE, 8).state_dict(),
               "args": argparse.Namespace(size=SIZE)}  # as rosinality's train.py saves them
    torch.save(teacher, root / "stylegan2.pt")
    cfgs = {1: config(stage=1, init=str(root / "stylegan2.pt"), out_dir=str(root / "s1"), steps=2),
            2: config(stage=2, init=str(root / "s1" / "latest.pt"), face_dir=str(faces), art_dir=str(art),
                      out_dir=str(root / "s2"), steps=2, r1_every=1, augment="color,translation,cutout"),
            3: config(stage=3, init=str(root / "s2" / "latest.pt"), face_dir=str(faces), out_dir=str(root / "s3"),
                      steps=2)}
    initial, results = {}, {}
    for s, cfg in cfgs.items():
        initial[s] = build_stage(cfg, encoders=ENCODERS)
        results[s] = run_quietly(cfg)
    return teacher, cfgs, initial, results


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k].cpu(), after[k])}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_exactly_its_parameters(chain, stage):
    _, _, initial, results = chain
    start = initial[stage]
    g_params = {k for k, _ in start.G.named_parameters()}
    assert changed(start.G.state_dict(), results[stage]["G_model"]) == {
        k for k in g_params if k.startswith(TRAINED[stage])}
    d_changed = changed(start.D.state_dict(), results[stage]["D_model"])
    assert d_changed == ({k for k, _ in start.D.named_parameters()} if stage == 2 else set())


def test_stage1_starts_from_the_teacher(chain):
    teacher, _, _, results = chain
    g, g_ema, d = teacher["g_ema"], results[1]["G_ema_model"], results[1]["D_model"]
    # at 128² the decoder's 16–128 px layers are the teacher's convs 2–9 and to_rgbs 1–4
    for ours, theirs in [("mapping_z.1.weight", "style.1.weight"), ("decoder1a.conv.weight", "convs.2.conv.weight"),
                         ("decoder4b.noise.weight", "convs.9.noise.weight"), ("to_rgb1.bias", "to_rgbs.1.bias"),
                         ("to_rgb4.conv.modulation.weight", "to_rgbs.4.conv.modulation.weight")]:
        assert torch.equal(g_ema[ours], g[theirs]), ours
    assert all(torch.equal(d[k], v) for k, v in teacher["d"].items())


def test_stages_chain_into_a_loadable_stylizer(chain):
    _, cfgs, _, results = chain
    out3 = Path(cfgs[3].out_dir)
    model = Stylizer.from_checkpoint(out3 / "stylizer.safetensors")
    assert model.config.size == SIZE and model.clip_mapper is not None
    assert all(torch.equal(v, results[3]["G_ema_model"][k]) for k, v in model.state_dict().items())
    official = Stylizer.from_checkpoint(out3 / "latest.pt")  # the official layout: G_ema_model, D_model
    assert all(torch.equal(v, results[3]["G_ema_model"][k]) for k, v in official.state_dict().items())
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():  # the exported mapper turns CLIP embeddings into the styles it learnt
        styles = model.map_clip(ENCODERS["clip"].encode_image(x))
        out = model(x, clip_feats=ENCODERS["clip"].encode_image(x), noise="zero")
    torch.testing.assert_close(out, model(x, w_plus=styles, noise="zero"), rtol=0, atol=0)
    assert (styles[0] - styles[1]).abs().max() > 1e-3 and (out[0] - out[1]).abs().max() > 1e-3
    # stage III touches only the mapper: everything else is stage II's G_ema and D
    for k, v in results[2]["G_ema_model"].items():
        assert torch.equal(results[3]["G_ema_model"][k], v), k
    assert all(torch.equal(results[3]["D_model"][k], v) for k, v in results[2]["D_model"].items())


def test_logs_and_samples(chain):
    _, cfgs, _, _ = chain
    out2 = Path(cfgs[2].out_dir)
    lines = (out2 / "losses.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "d_gan", "r1", "g_gan", "structure", "g_total"]
    assert [row.split(",")[0] for row in lines[1:]] == ["1", "2"]
    assert all(np.isfinite(float(v)) for row in lines[1:] for v in row.split(","))
    grid = Image.open(out2 / "samples" / "0000002.png")
    assert grid.size == (5 * SIZE, 2 * SIZE)  # 5 usable faces; rows: input, stylized
    assert Image.open(Path(cfgs[3].out_dir) / "samples" / "0000002.png").size == (5 * SIZE, 3 * SIZE)


def test_ema_follows_the_trained_weights(chain):
    _, cfgs, _, _ = chain
    stage = build_stage(config(stage=1, init=cfgs[1].init, out_dir="unused", ema_decay=0.9))
    before = {k: v.clone() for k, v in stage.G.state_dict().items()}
    torch.manual_seed(0)
    stage.train_step({}, 0)
    stage.update_ema()
    after, ema = stage.G.state_dict(), stage.G_ema.state_dict()
    for k in before:
        torch.testing.assert_close(ema[k], before[k] + 0.1 * (after[k] - before[k]), rtol=0, atol=1e-6)


def test_resume_equals_uninterrupted(tmp_path, image_dirs):
    faces, art = image_dirs
    # stage II has the most state to restore: two optimisers, lazy R1, mixing, augmentation, data order
    common = dict(stage=2, random_init=True, face_dir=str(faces), art_dir=str(art), r1_every=2, mixing=0.5,
                  augment="color,translation,cutout", size=64, ngf=2, d_base=4)
    straight = run_quietly(config(out_dir=str(tmp_path / "a"), steps=3, **common))
    run_quietly(config(out_dir=str(tmp_path / "b"), steps=2, **common))
    resumed = run_quietly(config(out_dir=str(tmp_path / "b"), steps=3, resume=True, **common))
    assert resumed["step"] == straight["step"] == 3

    def assert_same(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                assert_same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                assert_same(x, y, f"{where}[{i}]")
        elif torch.is_tensor(a):
            assert torch.equal(a, b), where
        elif where != "ckpt.config.resume" and where != "ckpt.config.out_dir":
            assert a == b, where

    assert_same(straight, resumed, "ckpt")
    assert (tmp_path / "a" / "losses.csv").read_text() == (tmp_path / "b" / "losses.csv").read_text()


def test_truncated_checkpoint_is_a_clear_error(chain, tmp_path):
    _, cfgs, _, _ = chain
    data = (Path(cfgs[1].out_dir) / "latest.pt").read_bytes()
    (tmp_path / "latest.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        train(config(stage=1, init=cfgs[1].init, out_dir=str(tmp_path), steps=3, resume=True))
    torch.save({"g_ema": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an MMFS training checkpoint"):
        read_stage_checkpoint(tmp_path / "foreign.pt")


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    atomic_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_r1_penalty_matches_autograd_and_finite_differences():
    torch.manual_seed(0)
    D = Discriminator(16, base=2, impl="ref").double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    r1 = r1_penalty(D, x)
    # the value: Σ_pixels (∂ΣD/∂x)², averaged over the batch, with the gradient by central differences
    direction = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        slope = (D(x + eps * direction).sum() - D(x - eps * direction).sum()) / (2 * eps)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(xg).sum(), xg)
    torch.testing.assert_close((grad * direction).sum(), slope, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r1, grad.square().sum() / len(x), rtol=1e-12, atol=0)
    # the gradient w.r.t. D's weights (the custom ops' double backward) against finite differences
    (analytic,) = torch.autograd.grad(r1, D.convs[1].conv2[1].weight)
    weight = D.convs[1].conv2[1].weight
    for index in [(0, 0, 0, 0), (1, 1, 1, 2)]:
        values = []
        for step in (eps, -2 * eps, eps):
            with torch.no_grad():
                weight[index] += step
            values.append(r1_penalty(D, x).detach())
        plus, minus = values[:2]
        torch.testing.assert_close(analytic[index], (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_image_folder_skips_bad_files_and_loads_per_spec(image_dirs):
    faces, _ = image_dirs
    with pytest.warns(UserWarning) as record:
        folder = ImageFolder(faces, size=SIZE, min_size=64)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any("broken.jpg: unreadable" in m for m in messages) and any("tiny.png: too small" in m for m in messages)
    assert [p.name for p in folder.paths] == ["face1.png", "face3.png", "face0.png", "face2.png", "face4.png"]
    expected = np.asarray(Image.open(folder.paths[0]).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS),
                          dtype=np.float32) / 127.5 - 1
    assert torch.equal(folder[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_step_sampler_partitions_the_stream_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(StepSampler(7, seed=5), 20)
    ranks = [take(StepSampler(7, seed=5, rank=r, world_size=2), 10) for r in range(2)]
    assert [ranks[i % 2][i // 2] for i in range(20)] == single  # ranks deal the same stream
    assert sorted(single[:7]) == list(range(7)) and sorted(single[7:14]) == list(range(7))  # epochs are permutations
    assert take(StepSampler(7, seed=5, rank=1, world_size=2, start=4), 6) == ranks[1][4:10]


def test_augmentations_shift_and_cut_out():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    shifted = augment(x, ("translation",))
    padded = F.pad(x.detach(), (4, 4, 4, 4))
    for i in range(3):  # each image is x shifted by at most 32/8 px, zero-filled
        assert any(torch.equal(shifted[i].detach(), padded[i, :, dy:dy + 32, dx:dx + 32])
                   for dy in range(9) for dx in range(9))
    cut = augment(x, ("cutout",)).detach()
    for i in range(3):
        zero = (cut[i] != x[i].detach()).any(0) | (cut[i] == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16 and (cut[i][:, zero] == 0).all()
    augment(x, ("color", "translation", "cutout")).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_file_flags_and_errors(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("stage: 3\nrandom_init: true\nface_dir: faces\nsteps: 5\n")
    cfg = make_config(tmp_path / "cfg.yaml", steps=7, lr=None)
    assert (cfg.stage, cfg.steps, cfg.learning_rate, cfg.betas) == (3, 7, 2e-4, (0.9, 0.999))
    (tmp_path / "bad.yaml").write_text("stage: 1\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        make_config(tmp_path / "bad.yaml")
    assert cli.main(["--stage", "2", "--augment", "blur"]) == 2
    err = capsys.readouterr().err
    assert "stage 2 needs face_dir" in err and "unknown augmentation(s) blur" in err and "needs init" in err
    (tmp_path / "latest.pt").write_bytes(b"")
    assert cli.main(["--stage", "1", "--random-init", "--out-dir", str(tmp_path)]) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err


def test_torchrun_two_processes_on_gloo(tmp_path):
    args = ["--stage", "1", "--random-init", "--out-dir", str(tmp_path), "--steps", "2", "--impl", "ref",
            "--size", str(SIZE), "--ngf", "4", "--style-dim", str(STYLE_DIM), "--n-mlp", "2", "--d-base", "8",
            "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mmfs_fast.train", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # ranks draw different z
    start = build_stage(config(stage=1, random_init=True, out_dir=str(tmp_path)))  # what the CLI flags say
    assert changed(start.G.state_dict(), ckpt["G_model"]) == {
        k for k, _ in start.G.named_parameters() if k.startswith(TRAINED[1])}
