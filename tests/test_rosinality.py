"""rosinality StyleGAN2 checkpoints of every size: their key → shape tables written here from
the published channel table (stylegan2-pytorch model.py, channel_multiplier 2), loading as the
Stage I teacher, and the 1024 → 512 px seeding of the Stylizer."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from conftest import layout_state_dict
from mmfs_fast.models import CheckpointError, Discriminator, Generator, Stylizer
from mmfs_fast.models.checkpoint import load_state, stylegan2_to_stylizer
from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.trainer import build_stage
from test_models import manual_generator, np_state, randomise_biases

# rosinality's Generator.channels at channel_multiplier 2: fixed per resolution, whatever the size
CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


def rosinality_layout(size: int, style_dim: int = 512, n_mlp: int = 8, channels=CHANNELS) -> dict[str, list[int]]:
    """Key → shape of rosinality's ``Generator(size, style_dim, n_mlp).state_dict()``."""
    layout = {}
    for i in range(1, n_mlp + 1):
        layout[f"style.{i}.weight"], layout[f"style.{i}.bias"] = [style_dim, style_dim], [style_dim]

    def modulated(prefix, c_in, c_out, k, up=False):
        layout[f"{prefix}.weight"] = [1, c_out, c_in, k, k]
        if up:
            layout[f"{prefix}.blur.kernel"] = [4, 4]
        layout[f"{prefix}.modulation.weight"], layout[f"{prefix}.modulation.bias"] = [c_in, style_dim], [c_in]

    def styled_conv(prefix, c_in, c_out, up=False):
        modulated(prefix + ".conv", c_in, c_out, 3, up)
        layout[f"{prefix}.noise.weight"], layout[f"{prefix}.activate.bias"] = [1], [c_out]

    def to_rgb(prefix, c_in, up=True):
        layout[f"{prefix}.bias"] = [1, 3, 1, 1]
        if up:
            layout[f"{prefix}.upsample.kernel"] = [4, 4]
        modulated(prefix + ".conv", c_in, 3, 1)

    layout["input.input"] = [1, channels[4], 4, 4]
    styled_conv("conv1", channels[4], channels[4])
    to_rgb("to_rgb1", channels[4], up=False)
    log_size = int(math.log2(size))
    for i in range(3, log_size + 1):
        c_in, c_out = channels[2 ** (i - 1)], channels[2 ** i]
        styled_conv(f"convs.{2 * (i - 3)}", c_in, c_out, up=True)
        styled_conv(f"convs.{2 * (i - 3) + 1}", c_out, c_out)
        to_rgb(f"to_rgbs.{i - 3}", c_out)
    for j in range((log_size - 2) * 2 + 1):
        r = 2 ** ((j + 5) // 2)
        layout[f"noises.noise_{j}"] = [1, 1, r, r]
    return layout


@pytest.fixture(scope="module")
def g1024():
    return layout_state_dict(rosinality_layout(1024), seed=7)


def test_the_written_table_is_the_official_512_layout(official_layout):
    assert rosinality_layout(512) == official_layout["stylegan2_g"]


@pytest.mark.parametrize("size", [64, 256, 512, 1024])
def test_every_size_loads_strictly(size):
    layout = rosinality_layout(size)
    with torch.device("meta"):
        assert {k: list(v.shape) for k, v in Generator(size=size).state_dict().items()} == layout
    g = layout_state_dict(layout, seed=size)
    teacher = Generator.from_state(g, f"stylegan2-{size}.pt")
    assert teacher.size == size and teacher.n_latent == 2 * int(math.log2(size)) - 2
    loaded = teacher.state_dict()
    assert loaded.keys() == g.keys() and all(torch.equal(loaded[k], g[k]) for k in g)
    load_state(Generator(size=size), g)  # strict: every key, every shape


def test_channel_multiplier_1_loads_too():
    cm1 = {r: 512 if r <= 32 else 256 * 64 // r for r in CHANNELS}  # rosinality: 256·m at 64 px, halving
    g = layout_state_dict(rosinality_layout(256, style_dim=16, n_mlp=2, channels=cm1))
    teacher = Generator.from_state(g, "cm1.pt")
    assert [teacher.channels(2 ** i) for i in range(2, 9)] == [512, 512, 512, 512, 256, 128, 64]


def test_1024_seeds_the_512_stylizer_from_exactly_its_64_to_512_px_layers(g1024):
    state, line = stylegan2_to_stylizer(g1024, 512, "ffhq-1024.pt")
    expected = {f"mapping_z.{i}.{p}": f"style.{i}.{p}" for i in range(1, 9) for p in ("weight", "bias")}
    for i in range(1, 5):  # decoder{i} renders 2^(i+5) px, rosinality's convs 2i+4, 2i+5 and to_rgbs i+2
        for ours, theirs in ((f"decoder{i}a", f"convs.{2 * i + 4}"), (f"decoder{i}b", f"convs.{2 * i + 5}"),
                             (f"to_rgb{i}", f"to_rgbs.{i + 2}")):
            expected.update({ours + k[len(theirs):]: k for k in g1024 if k.startswith(theirs + ".")})
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[ours], g1024[theirs]) for ours, theirs in expected.items())
    assert line == ("ffhq-1024.pt: seeding the 512-px Stylizer from a 1024-px StyleGAN2 generator: "
                    "style.1–8 → mapping_z, convs.6–13 → decoder1a–decoder4b, to_rgbs.3–6 → to_rgb1–4 "
                    "(64–512 px); its 4–32 px and 1024 px layers are not used")
    with pytest.warns(UserWarning, match="encoder, decoder0 and to_rgb0 keep their random"):
        model = Stylizer.from_checkpoint({"g_ema": g1024, "d": {}})
    loaded = model.state_dict()
    assert all(torch.equal(loaded[ours], g1024[theirs]) for ours, theirs in expected.items())


@pytest.mark.parametrize("size", [32, 256])
def test_a_generator_smaller_than_the_stylizer_is_refused_naming_size_and_file(size, tmp_path):
    g = layout_state_dict(rosinality_layout(size))
    Generator.from_state(g, "small.pt")  # a fine generator, just not one that can seed 512²
    with pytest.raises(CheckpointError, match=rf"small\.pt: a {size}-px StyleGAN2 generator cannot seed a 512-px"):
        stylegan2_to_stylizer(g, 512, "small.pt")
    path = tmp_path / f"stylegan2-{size}.pt"
    torch.save({"g_ema": g, "d": {}}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: a {size}-px StyleGAN2 generator cannot seed")):
        Stylizer.from_checkpoint(path)


def test_unusable_generators_are_refused_before_allocating(g1024):
    too_big = dict(g1024, **{"to_rgbs.8.bias": torch.zeros(1, 3, 1, 1)})  # claims 2048 px
    with pytest.raises(CheckpointError, match=r"huge\.pt: .*a 2048-px model"):
        Generator.from_state(too_big, "huge.pt")
    wrong = dict(g1024, **{"convs.9.conv.weight": torch.zeros(1, 255, 256, 3, 3)})
    with pytest.raises(CheckpointError, match=r"(?s)odd\.pt: 1024-px StyleGAN2 generator: .*convs\.9\.conv\.weight"):
        Generator.from_state(wrong, "odd.pt")
    # 65 536 channels claimed by two small tensors: a model built from that would need ~150 GB
    # per conv weight; the meta-device check refuses it before anything is allocated
    wide = dict(g1024, **{"input.input": torch.zeros(1, 65536, 4, 4),
                          "to_rgbs.7.conv.weight": torch.zeros(1, 3, 65536, 1, 1)})
    with pytest.raises(CheckpointError, match=r"(?s)wide\.pt: 1024-px StyleGAN2 generator: .*conv1\.conv\.weight"):
        Generator.from_state(wide, "wide.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt: not a rosinality StyleGAN2 generator"):
        Generator.from_state({"style.1.weight": torch.zeros(2, 2)}, "empty.pt")


def test_generator_at_256_equals_independent_recomputation():
    """The 256-px structure (6 upsampling blocks, 14 styles) with a narrow channel table, so
    that the loop-based numpy reference stays quick."""
    torch.manual_seed(4)
    g = randomise_biases(Generator(size=256, style_dim=8, n_mlp=1, channel_base=256, channel_max=4)
                         .double().eval())
    assert [g.channels(2 ** i) for i in range(2, 9)] == [4, 4, 4, 4, 4, 2, 1]
    sd = np_state(g)
    w_plus = torch.randn(1, g.n_latent, 8, dtype=torch.float64)
    noises = [sd[f"noises.noise_{i}"] for i in range(len(g.noise_resolutions))]
    with torch.no_grad():
        got = g(w_plus=w_plus, noise="const").numpy()
    assert g.n_latent == 14 and got.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(got, manual_generator(sd, w_plus.numpy(), noises, n_blocks=6), rtol=1e-9, atol=1e-12)


# -- Stage I from a teacher larger than the Stylizer, at tiny scale --------------
def tiny_stylegan2_checkpoint(path, teacher_size: int, size: int, ngf: int, d_base: int):
    """A rosinality-style checkpoint of ``teacher_size`` px whose channels at ``size`` px and
    below are those of a ``size``-px Stylizer/Discriminator of width ngf/d_base (as the 1024-px
    FFHQ model's are the 512-px one's), and its discriminator one block deeper."""
    table = {2 ** i: min(8 * ngf, ngf * size // 2 ** i) for i in range(2, 11)}
    g = layout_state_dict(rosinality_layout(teacher_size, style_dim=16, n_mlp=2, channels=table), seed=11)
    d_small = Discriminator(size, base=d_base).state_dict()
    c_big, c_small = d_base // 2, d_small["convs.0.0.weight"].shape[0]
    d = {f"convs.{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}" if k.startswith("convs.") else k: v
         for k, v in d_small.items() if not k.startswith("convs.0.")}
    big_input = Discriminator(teacher_size, base=d_base // 2).state_dict()  # convs.0: 3 → c_big, convs.1 …
    d.update({k: torch.randn_like(v) for k, v in big_input.items() if k.startswith(("convs.0.", "convs.1."))})
    assert d["convs.1.conv2.1.weight"].shape[0] == c_small and d["convs.0.0.weight"].shape[0] == c_big
    torch.save({"g_ema": g, "d": d}, path)
    return g, d


def test_stage1_takes_a_larger_teacher_and_says_which_layers(tmp_path, capsys):
    path = tmp_path / "teacher-128.pt"
    g, d = tiny_stylegan2_checkpoint(path, 128, size=64, ngf=4, d_base=8)
    cfg = TrainConfig(stage=1, init=str(path), out_dir=str(tmp_path / "run"), size=64, ngf=4, style_dim=16,
                      n_mlp=2, d_base=8, batch_size=2, impl="ref", workers=0)
    stage = build_stage(cfg)
    assert capsys.readouterr().out.strip() == (
        f"{path}: seeding the 64-px Stylizer from a 128-px StyleGAN2 generator: style.1–2 → mapping_z, "
        "convs.0–7 → decoder1a–decoder4b, to_rgbs.0–3 → to_rgb1–4 (8–64 px); its 4 px and 128 px layers "
        "are not used; D: its input layer convs.0 starts random")
    sd = stage.G.state_dict()
    assert torch.equal(sd["decoder1a.conv.weight"], g["convs.0.conv.weight"])
    assert torch.equal(sd["to_rgb4.bias"], g["to_rgbs.3.bias"])
    d_sd = stage.D.state_dict()
    assert all(torch.equal(d_sd[f"convs.{i}.conv1.0.weight"], d[f"convs.{i + 1}.conv1.0.weight"]) for i in (1, 2, 3))
    assert torch.equal(d_sd["final_linear.1.weight"], d["final_linear.1.weight"])
    z = torch.randn(2, 16)
    with torch.no_grad():
        x = stage.teacher_images(z, noise="zero")
        assert x.shape == (2, 3, 64, 64)
        full = stage.teacher(z=z, noise="zero").clamp(-1, 1)
        assert torch.allclose(x, full.reshape(2, 3, 64, 2, 64, 2).mean(dim=(3, 5)))


def test_stage1_refuses_a_smaller_teacher_naming_the_file(tmp_path):
    path = tmp_path / "teacher-32.pt"
    torch.save({"g_ema": layout_state_dict(rosinality_layout(32, style_dim=16, n_mlp=2)), "d": {}}, path)
    cfg = TrainConfig(stage=1, init=str(path), out_dir=str(tmp_path / "run"), size=64, ngf=4, style_dim=16,
                      n_mlp=2, d_base=8, impl="ref", workers=0)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: a 32-px StyleGAN2 generator cannot seed a 64-px")):
        build_stage(cfg)
