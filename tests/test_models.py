"""Models against the official layout (SPEC §3, §4), checkpoint formats, and the
Stylizer forward against an independent numpy re-computation from its state dict."""
import math

import numpy as np
import pytest
import torch

import naive
from conftest import layout_state_dict
from mmfs_fast.models import CheckpointError, Discriminator, Generator, Stylizer, StylizerConfig, set_fused_modconv
from mmfs_fast.models.layers import ModulatedConv2d

FIR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0


def tiny_stylizer(seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(size=32, ngf=4, style_dim=16, n_mlp=2)
    config.update(kw)
    model = Stylizer(**config).double().eval()
    with torch.no_grad():  # non-zero noise strengths and biases so that every term shows
        for name, p in model.named_parameters():
            if name.endswith(("noise.weight", "bias")):
                p.uniform_(-0.5, 0.5)
    return model


# -- an independent forward pass, straight from the definitions ------------------
def np_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def equal_linear(sd, prefix, x, lr_mul=1.0, activate=False):
    w = sd[prefix + ".weight"] * lr_mul / math.sqrt(sd[prefix + ".weight"].shape[1])
    out = x @ w.T
    b = sd[prefix + ".bias"] * lr_mul
    if activate:
        return naive.bias_act(out, b, "lrelu", 0.2, math.sqrt(2), None, 1)
    return out + b


def conv_layer(sd, prefix, x, k, downsample=False, activate=True, bias=True):
    idx = 0
    if downsample:
        p = 2 + (k - 1)
        x = naive.upfirdn2d(x, FIR, 1, 1, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
        idx = 1
    w = sd[f"{prefix}.{idx}.weight"] / math.sqrt(sd[f"{prefix}.{idx}.weight"][0].size)
    stride, pad = (2, 0) if downsample else (1, k // 2)
    x = np.stack([naive.conv2d(s, w, stride, pad) for s in x])
    if activate:
        b = sd[f"{prefix}.{idx + 1}.bias"] if bias else None
        return naive.bias_act(x, b, "lrelu", 0.2, math.sqrt(2), None, 1)
    return x


def res_block(sd, prefix, x):
    out = conv_layer(sd, prefix + ".conv2", conv_layer(sd, prefix + ".conv1", x, 3), 3, downsample=True)
    skip = conv_layer(sd, prefix + ".skip", x, 1, downsample=True, activate=False)
    return (out + skip) / math.sqrt(2)


def modulated(sd, prefix, x, w, demodulate=True, up=1):
    weight = sd[prefix + ".weight"][0]
    styles = equal_linear(sd, prefix + ".modulation", w)
    return naive.modulated_conv2d(x, weight / math.sqrt(weight[0].size), styles, demodulate, up, 1, FIR)


def styled_conv(sd, prefix, x, w, noise, up=1):
    x = modulated(sd, prefix + ".conv", x, w, up=up) + sd[prefix + ".noise.weight"] * noise
    return naive.bias_act(x, sd[prefix + ".activate.bias"], "lrelu", 0.2, math.sqrt(2), None, 1)


def to_rgb(sd, prefix, x, w, skip=None):
    out = modulated(sd, prefix + ".conv", x, w, demodulate=False) + sd[prefix + ".bias"]
    if skip is not None:
        out = out + naive.upfirdn2d(skip, FIR * 4, 2, 1, (2, 1, 2, 1))
    return out


def manual_stylizer(sd, x, w_plus, noises):
    f = conv_layer(sd, "encoder.0", x, 3)
    for i in range(1, 5):
        f = res_block(sd, f"encoder.{i}", f)
    f = conv_layer(sd, "encoder.5", f, 3)
    S = [w_plus[:, i] for i in range(10)]
    f = styled_conv(sd, "decoder0", f, S[0], noises[0])
    rgb = to_rgb(sd, "to_rgb0", f, S[1])
    for i in range(1, 5):
        f = styled_conv(sd, f"decoder{i}a", f, S[2 * i - 1], noises[2 * i - 1], up=2)
        f = styled_conv(sd, f"decoder{i}b", f, S[2 * i], noises[2 * i])
        rgb = to_rgb(sd, f"to_rgb{i}", f, S[2 * i + 1], rgb)
    return np.clip(rgb, -1, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "unfused"])
def test_stylizer_forward_equals_independent_recomputation(fused):
    model = tiny_stylizer()
    set_fused_modconv(model, fused)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    w_plus = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, r, r, generator=g, dtype=torch.float64) for r in model.noise_resolutions]
    with torch.no_grad():
        out = model(x, w_plus=w_plus, noise=noises)
    expected = manual_stylizer(np_state(model), x.numpy(), w_plus.numpy(), [n.numpy() for n in noises])
    assert 0 < np.abs(expected).max() and (np.abs(expected) < 1).any()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_training_runs_unfused_with_the_gradients_of_the_op():
    """NVlabs' rule: in training mode the modulated convolutions run as conv(x·s, W) plus
    demodulation; every parameter's gradient equals that of the modulated_conv2d op."""
    model = tiny_stylizer().train()
    assert all(m.fused is None for m in model.modules() if isinstance(m, ModulatedConv2d))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    w_plus = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    grads = {}
    for fused in (None, True):
        set_fused_modconv(model, fused)
        model.zero_grad()
        model(x, w_plus=w_plus, noise="zero").square().mean().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[None].keys() == grads[True].keys() and len(grads[None]) > 10
    for name, grad in grads[None].items():
        torch.testing.assert_close(grad, grads[True][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("upsample", [False, True])
def test_unfused_under_bf16_autocast_is_as_accurate_as_the_op(upsample):
    """Error against fp32 at most the op's own under the same autocast plus one bf16 rounding
    of the output: the demodulation multiplies the convolution's bf16 output, where the op
    folds it into the weights."""
    torch.manual_seed(0)
    layer = ModulatedConv2d(32, 16, 3, 16, upsample=upsample)
    x, w = torch.randn(4, 32, 8, 8), torch.randn(4, 16)
    want = layer.eval()(x, w)
    errors = {}
    for fused in (True, False):
        layer.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x, w)
        assert got.dtype == torch.bfloat16
        errors[fused] = (got.float() - want).abs().max().item()
    assert 0 < errors[False] <= errors[True] + torch.finfo(torch.bfloat16).eps * want.abs().max().item()


def test_z_style_is_the_mapped_w_repeated_and_mixing_crosses_over_once():
    model = tiny_stylizer()
    z = torch.randn(3, 16, dtype=torch.float64)
    sd = np_state(model)
    w = z.numpy() / np.sqrt((z.numpy() ** 2).mean(1, keepdims=True) + 1e-8)
    for i in range(1, 3):
        w = equal_linear(sd, f"mapping_z.{i}", w, lr_mul=0.01, activate=True)
    with torch.no_grad():
        np.testing.assert_allclose(model.map_z(z).numpy(), w, rtol=1e-10)
        styles = model.style_from_z(z)
        assert styles.shape == (3, 10, 16) and torch.equal(styles, styles[:, :1].expand_as(styles))
        mixed = model.style_from_z(z, mixing=True, generator=torch.Generator().manual_seed(0))
    same = (mixed == styles).all(dim=2).all(dim=0)
    crossover = int(same.logical_not().nonzero()[0])
    assert 1 <= crossover <= 9 and same[:crossover].all() and not same[crossover:].any()


# which modules read w+ row i: the official indexing, where each ToRGB shares its row
# with the next block's upsampling conv
STYLE_READERS = {0: {"decoder0"}, 1: {"to_rgb0", "decoder1a"}, 2: {"decoder1b"}, 3: {"to_rgb1", "decoder2a"},
                 4: {"decoder2b"}, 5: {"to_rgb2", "decoder3a"}, 6: {"decoder3b"}, 7: {"to_rgb3", "decoder4a"},
                 8: {"decoder4b"}, 9: {"to_rgb4"}}


def test_each_w_plus_row_feeds_the_official_layers():
    model = tiny_stylizer()
    seen = {}
    for name, module in model.named_modules():
        if name.endswith(".modulation"):
            owner = name.split(".")[0]
            module.register_forward_hook(lambda m, args, out, owner=owner: seen.__setitem__(owner, args[0].clone()))
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    w_plus = torch.randn(1, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        model(x, w_plus=w_plus, noise="zero")
        base = dict(seen)
        for row, readers in STYLE_READERS.items():
            perturbed = w_plus.clone()
            perturbed[:, row] += 1.0
            model(x, w_plus=perturbed, noise="zero")
            changed = {name for name in base if not torch.equal(base[name], seen[name])}
            assert changed == readers, row


def test_noise_modes():
    model = tiny_stylizer()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    z = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        a = model(x, z=z, generator=torch.Generator().manual_seed(3))
        b = model(x, z=z, generator=torch.Generator().manual_seed(3))
        c = model(x, z=z, generator=torch.Generator().manual_seed(4))
        zero = model(x, z=z, noise="zero")
        explicit_zero = model(x, z=z, noise=[torch.zeros(2, 1, r, r, dtype=torch.float64)
                                             for r in model.noise_resolutions])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(zero, explicit_zero)
    assert model.noise_resolutions == [2, 4, 4, 8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="expected 9 tensors"):
        model(x, z=z, noise=[torch.zeros(2, 1, 2, 2)])
    with pytest.raises(ValueError, match=r"noise\[1\]: expected shape"):
        model(x, z=z, noise=[torch.zeros(2, 1, r, r, dtype=torch.float64) for r in [2] * 9])
    with pytest.raises(ValueError, match="noise must be"):
        model(x, z=z, noise="gaussian")


def test_bad_inputs_get_clear_errors():
    model = tiny_stylizer()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 32, 32\)"):
        model(torch.rand(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 but the model is torch.float64"):
        model(x.float())
    with pytest.raises(ValueError, match="at most one style source"):
        model(x, z=torch.randn(1, 16, dtype=torch.float64), w_plus=torch.randn(1, 10, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"w_plus must have shape \(1, 10, 16\)"):
        model(x, w_plus=torch.randn(1, 9, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mixing applies to z"):
        model(x, w_plus=torch.randn(1, 10, 16, dtype=torch.float64), mixing=True)
    with pytest.raises(ValueError, match="power of two"):
        StylizerConfig(size=48)


def layer_norm(sd, prefix, x):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def self_attention(sd, prefix, x, heads):
    """Multi-head self-attention over the sequence axis of x (L, B, D)."""
    length, batch, dim = x.shape
    q, k, v = np.split(x @ sd[prefix + ".in_proj_weight"].T + sd[prefix + ".in_proj_bias"], 3, axis=-1)
    split = lambda t: t.reshape(length, batch, heads, dim // heads).transpose(1, 2, 0, 3)  # noqa: E731 (B, H, L, d)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(dim // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ split(v)).transpose(2, 0, 1, 3).reshape(length, batch, dim)
    return out @ sd[prefix + ".out_proj.weight"].T + sd[prefix + ".out_proj.bias"]


def manual_clip_mapper(sd, feats, n_layers=4, heads=8):
    """SPEC §3: normalised embedding + position embedding, pre-norm transformer layers, leaky ReLU."""
    x = (feats / np.linalg.norm(feats, axis=1, keepdims=True))[None] + sd["clip_mapper.position_embedding"][:, None]
    for i in range(n_layers):
        layer = f"clip_mapper.transformer.layers.{i}"
        x = x + self_attention(sd, layer + ".self_attn", layer_norm(sd, layer + ".norm1", x), heads)
        hidden = np.maximum(layer_norm(sd, layer + ".norm2", x) @ sd[layer + ".linear1.weight"].T
                            + sd[layer + ".linear1.bias"], 0)
        x = x + hidden @ sd[layer + ".linear2.weight"].T + sd[layer + ".linear2.bias"]
    return np.where(x > 0, x, 0.2 * x).transpose(1, 0, 2)


def test_clip_mapper_equals_independent_recomputation():
    model = tiny_stylizer()
    with torch.no_grad():  # LayerNorms that are not the identity
        for name, p in model.clip_mapper.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    feats = torch.randn(3, 16, dtype=torch.float64)
    expected = manual_clip_mapper(np_state(model), feats.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(model.map_clip(feats).numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(model.map_clip(feats * 5).numpy(), expected, rtol=1e-9, atol=1e-12)


# -- official layouts ----------------------------------------------------------
@pytest.mark.parametrize("name,build", [
    ("G_ema_model", lambda: Stylizer()),
    ("D_model", lambda: Discriminator()),
    ("stylegan2_g", lambda: Generator()),
])
def test_models_have_exactly_the_official_keys_and_shapes(official_layout, name, build):
    with torch.device("meta"):
        model = build()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official_layout[name]


@pytest.fixture(scope="module")
def official_stylizer_state(official_layout):
    return layout_state_dict(official_layout["G_ema_model"])


def test_official_checkpoint_loads_strictly_and_round_trips(official_stylizer_state, tmp_path):
    path = tmp_path / "phase3.pth"
    torch.save({"G_ema_model": official_stylizer_state, "D_model": {}}, path)
    model = Stylizer.from_checkpoint(path)
    exported = model.official_state_dict()
    assert exported.keys() == official_stylizer_state.keys()
    assert all(torch.equal(exported[k], official_stylizer_state[k]) for k in exported)
    # the bare state dict and our safetensors file load to the same model
    bare = Stylizer.from_checkpoint(dict(official_stylizer_state))
    model.save(tmp_path / "model.safetensors")
    reloaded = Stylizer.from_checkpoint(tmp_path / "model.safetensors")
    for other in (bare, reloaded):
        assert all(torch.equal(v, other.official_state_dict()[k]) for k, v in exported.items())
    assert reloaded.config == model.config


def test_phase_1_checkpoint_has_no_clip_mapper(official_stylizer_state):
    state = {k: v for k, v in official_stylizer_state.items() if not k.startswith("clip_mapper.")}
    model = Stylizer.from_checkpoint({"G_ema_model": state})
    assert model.clip_mapper is None
    with pytest.raises(RuntimeError, match="no clip_mapper"):
        model.map_clip(torch.randn(1, 512))


def test_checkpoint_problems_are_listed_together(official_stylizer_state):
    state = dict(official_stylizer_state)
    del state["decoder2a.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["to_rgb0.bias"] = torch.zeros(1, 4, 1, 1)
    with pytest.raises(CheckpointError) as info:
        Stylizer.from_checkpoint({"G_ema_model": state})
    message = str(info.value)
    for fragment in ("missing keys (1): decoder2a.conv.weight", "unexpected keys (1): extra.weight",
                     "to_rgb0.bias: checkpoint (1, 4, 1, 1) vs model (1, 3, 1, 1)"):
        assert fragment in message


def test_stylegan2_checkpoint_converts(official_layout):
    g = layout_state_dict(official_layout["stylegan2_g"], seed=5)
    with pytest.warns(UserWarning, match="encoder, decoder0 and to_rgb0 keep their random"):
        model = Stylizer.from_checkpoint({"g_ema": g, "g": {}, "d": {}})
    sd = model.state_dict()
    assert torch.equal(sd["mapping_z.3.weight"], g["style.3.weight"])
    assert torch.equal(sd["decoder1a.conv.weight"], g["convs.6.conv.weight"])
    assert torch.equal(sd["decoder1b.noise.weight"], g["convs.7.noise.weight"])
    assert torch.equal(sd["decoder4b.activate.bias"], g["convs.13.activate.bias"])
    assert torch.equal(sd["to_rgb1.conv.modulation.weight"], g["to_rgbs.3.conv.modulation.weight"])
    assert torch.equal(sd["to_rgb4.bias"], g["to_rgbs.6.bias"])
    assert model.clip_mapper is None


@pytest.mark.parametrize("content,match", [
    (b"this is a text file, not a checkpoint\n", "not a readable PyTorch checkpoint"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", "corrupt safetensors"),
])
def test_non_checkpoint_files_are_rejected(tmp_path, content, match):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        Stylizer.from_checkpoint(path)


def test_truncated_and_foreign_checkpoints_are_rejected(tmp_path, official_stylizer_state):
    path = tmp_path / "full.pt"
    torch.save({"G_ema_model": official_stylizer_state}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        Stylizer.from_checkpoint(tmp_path / "cut.pt")
    torch.save({"model": {"fc.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an MMFS or StyleGAN2 checkpoint"):
        Stylizer.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        Stylizer.from_checkpoint(tmp_path / "missing.pt")


def test_from_checkpoint_casts_and_routes_ops(official_stylizer_state):
    model = Stylizer.from_checkpoint({"G_ema_model": official_stylizer_state}, dtype=torch.float64, impl="ref")
    assert model.decoder0.conv.weight.dtype == torch.float64 and not model.training
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"ref"}


# -- discriminator and generator -------------------------------------------------
def test_discriminator_minibatch_stddev_matches_definition():
    d = Discriminator(size=8, base=2).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    out = d.minibatch_stddev(x)
    groups = x.reshape(4, 2, 3, 4, 4)  # sample i of group member j is x[j * 2 + i]
    std = (groups.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # one value per group slot
    assert torch.allclose(out[:, 3], std.repeat(4)[:, None, None].expand(8, 4, 4))
    assert torch.equal(out[:, :3], x)


def np_discriminator_convs(sd, x, n_blocks):
    """The outputs of convs[0], convs[1], …: ConvLayer(3, c, 1), then the ResBlocks."""
    outs = [conv_layer(sd, "convs.0", x, 1)]
    for i in range(1, n_blocks + 1):
        outs.append(res_block(sd, f"convs.{i}", outs[-1]))
    return outs


def np_minibatch_stddev(x, group):
    y = x.reshape(group, -1, *x.shape[1:])
    std = np.sqrt(y.var(axis=0) + 1e-8).mean(axis=(1, 2, 3))  # per group slot
    stat = np.tile(std, group)[:, None, None, None] * np.ones((1, 1, *x.shape[2:]))
    return np.concatenate([x, stat], axis=1)


def manual_discriminator(sd, x, n_blocks, group=4):
    out = conv_layer(sd, "final_conv", np_minibatch_stddev(np_discriminator_convs(sd, x, n_blocks)[-1], group), 3)
    hidden = equal_linear(sd, "final_linear.0", out.reshape(len(x), -1), activate=True)
    return equal_linear(sd, "final_linear.1", hidden)


def randomise_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                p.uniform_(-0.5, 0.5)
    return model


def test_discriminator_logits_equal_independent_recomputation():
    torch.manual_seed(0)
    d = randomise_biases(Discriminator(size=16, base=2).double())
    x = torch.rand(8, 3, 16, 16, dtype=torch.float64) * 2 - 1  # two samples per stddev group slot
    with torch.no_grad():
        got = d(x).numpy()
    np.testing.assert_allclose(got, manual_discriminator(np_state(d), x.numpy(), n_blocks=2), rtol=1e-9, atol=1e-12)
    assert got.shape == (8, 1) and got.std() > 0


def test_discriminator_features_are_the_spec_layers():
    torch.manual_seed(1)
    d = randomise_biases(Discriminator(size=128, base=1).double())
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        feats = d(x, features=True)
    outs = np_discriminator_convs(np_state(d), x.numpy(), n_blocks=5)
    assert [f.shape[-1] for f in feats] == [64, 16, 8, 4]  # 256², 64², 32², 16² at 512²
    for got, want in zip(feats, [outs[1], outs[3], outs[4], outs[5]]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="feature mode needs size"):
        Discriminator(size=64, base=2)(torch.randn(1, 3, 64, 64), features=True)


def manual_generator(sd, w_plus, noises, n_blocks):
    """rosinality's synthesis: constant input, conv1 and to_rgb1, then per resolution an
    upsampling conv, a conv and a ToRGB; image unclamped."""
    f = np.repeat(sd["input.input"], len(w_plus), axis=0)
    f = styled_conv(sd, "conv1", f, w_plus[:, 0], noises[0])
    rgb = to_rgb(sd, "to_rgb1", f, w_plus[:, 1])
    for i in range(n_blocks):
        f = styled_conv(sd, f"convs.{2 * i}", f, w_plus[:, 2 * i + 1], noises[2 * i + 1], up=2)
        f = styled_conv(sd, f"convs.{2 * i + 1}", f, w_plus[:, 2 * i + 2], noises[2 * i + 2])
        rgb = to_rgb(sd, f"to_rgbs.{i}", f, w_plus[:, 2 * i + 3], rgb)
    return rgb


def test_generator_equals_independent_recomputation_with_truncation():
    torch.manual_seed(2)
    g = randomise_biases(Generator(size=16, style_dim=16, n_mlp=2, channel_base=32, channel_max=16).double().eval())
    sd = np_state(g)
    z = torch.randn(2, 16, dtype=torch.float64)
    mean_w = torch.randn(1, 16, dtype=torch.float64)
    w = z.numpy() / np.sqrt((z.numpy() ** 2).mean(1, keepdims=True) + 1e-8)
    for i in range(1, 3):
        w = equal_linear(sd, f"style.{i}", w, lr_mul=0.01, activate=True)
    noises = [sd[f"noises.noise_{i}"] for i in range(len(g.noise_resolutions))]
    with torch.no_grad():
        for truncation in (1.0, 0.7):
            got = g(z=z, noise="const", truncation=truncation, truncation_latent=mean_w).numpy()
            w_t = mean_w.numpy() + truncation * (w - mean_w.numpy())
            want = manual_generator(sd, np.repeat(w_t[:, None], g.n_latent, axis=1), noises, n_blocks=2)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert np.abs(want).max() > 1  # unclamped, unlike the Stylizer
        w_plus = torch.randn(2, g.n_latent, 16, dtype=torch.float64)  # a distinct style per layer
        np.testing.assert_allclose(g(w_plus=w_plus, noise="const").numpy(),
                                   manual_generator(sd, w_plus.numpy(), noises, n_blocks=2), rtol=1e-9, atol=1e-12)
    assert g.n_latent == 6
