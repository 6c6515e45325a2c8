"""CLIP and DINO wrappers (random-initialised ViT-B models; SPEC §5)."""
import collections
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmfs_fast.encoders import CLIPEncoder, DINOEncoder, EncoderWeightsError
from mmfs_fast.encoders.dino import input_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPEncoder(random_init=True)


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return DINOEncoder(random_init=True)


def images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def manual_preprocess(x, size, mean, std, antialias=True):
    x01 = (x + 1) / 2
    out = F.interpolate(x01, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return torch.stack([(out[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)


def test_clip_preprocess_and_embedding(clip):
    x = images(2, 96, 96)
    expected = manual_preprocess(x, (224, 224), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(clip.preprocess(x), expected, rtol=0, atol=1e-6)
    emb = clip.encode_image(x)
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    raw = clip.model.encode_image(expected)
    torch.testing.assert_close(emb, raw / raw.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_image_input_is_the_resize_then_the_affine_in_the_encoders_dtype():
    """Against the resize of (x + 1) / 2 followed by (· - mean) / std: written in fp16 without
    autograd (one rounding), and differentiable w.r.t. the images where they ask for it."""
    from mmfs_fast.encoders._common import ImageInput

    x = images(2, 96, 80, seed=4)
    expected = manual_preprocess(x, (32, 48), CLIP_MEAN, CLIP_STD)
    got = ImageInput(CLIP_MEAN, CLIP_STD, "cpu", torch.float16)(x, (32, 48))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -10, atol=1e-6)
    x.requires_grad_(True)
    weights = torch.randn(2, 3, 32, 48)
    got = ImageInput(CLIP_MEAN, CLIP_STD, "cpu", torch.float32)(x, (32, 48), antialias=False)
    grad, = torch.autograd.grad((got * weights).sum(), x)
    plain = manual_preprocess(x, (32, 48), CLIP_MEAN, CLIP_STD, antialias=False)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad((plain * weights).sum(), x)[0], rtol=1e-5, atol=1e-7)


def test_clip_preprocesses_bf16_images_on_the_cpu(clip):
    """The CPU has no antialiased bf16 resize: preprocessing computes in fp32 whatever comes in."""
    x = images(2, 96, 96).bfloat16()
    torch.testing.assert_close(clip.preprocess(x), clip.preprocess(x.float()), rtol=0, atol=0)


def tokens_by_hand(v, pixels):
    """Output of visual blocks 0..3 without CLS, from open_clip's VisionTransformer parts."""
    h = v.conv1(pixels).flatten(2).transpose(1, 2)  # (B, 49, 768)
    h = torch.cat([v.class_embedding.expand(len(h), 1, -1), h], dim=1) + v.positional_embedding
    h = v.ln_pre(h)
    if not v.transformer.batch_first:
        h = h.transpose(0, 1)
    for block in v.transformer.resblocks[:4]:
        h = block(h)
    if not v.transformer.batch_first:
        h = h.transpose(0, 1)
    return h[:, 1:]


def test_clip_layer4_tokens_match_blocks_run_by_hand(clip):
    x = images(1, 64, 64, seed=1).requires_grad_(True)
    expected = tokens_by_hand(clip.model.visual, manual_preprocess(x, (224, 224), CLIP_MEAN, CLIP_STD))
    tokens = clip.layer4_tokens(x)
    assert tokens.shape == (1, 49, 768)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)
    emb, tokens_too = clip.encode_image_and_tokens(x)
    torch.testing.assert_close(tokens_too, tokens)
    torch.testing.assert_close(emb, clip.encode_image(x), rtol=1e-5, atol=1e-6)
    # frozen weights, gradients still reach the image
    tokens.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())


def test_clip_text_and_pil(clip, tmp_path):
    from PIL import Image

    emb = clip.encode_text(["pop art", "photo"])
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    for bad in ("", "   ", [], ["ok", " "]):
        with pytest.raises(ValueError):
            clip.encode_text(bad)
    path = tmp_path / "ref.png"
    Image.new("RGB", (40, 30), (200, 10, 30)).save(path)
    pil_emb = clip.encode_pil([path, Image.open(path).convert("L")])
    assert pil_emb.shape == (2, 512)
    same_emb, tokens = clip.encode_pil_and_tokens([path])
    torch.testing.assert_close(same_emb[0], pil_emb[0])
    pixels = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(Image.open(path))
    torch.testing.assert_close(tokens, tokens_by_hand(clip.model.visual, pixels[None]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pil_emb.norm(dim=-1), torch.ones(2))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        clip.encode_pil([tmp_path / "junk.png"])


def _reference_clip(clip, dtype):
    """open_clip's CLIP as built (nn.MultiheadAttention, explicit causal mask) with the fused
    encoder's weights: same parameter names, so the state dict loads whole."""
    from mmfs_fast.encoders.clip import MODEL_NAME

    ref = open_clip.CLIP(**open_clip.get_model_config(MODEL_NAME))
    ref.load_state_dict(clip.model.state_dict())
    return ref.to(dtype).eval().requires_grad_(False)


def _clip_outputs(model, pixels, tokens):
    """The embeddings, the block-3 tokens, and the last two blocks' outputs (the other way
    open_clip's indices pick them) without running the tower to its end."""
    visual = model.visual.forward_intermediates(pixels, indices=[3], output_fmt="NLC")
    last = model.visual.forward_intermediates(pixels, indices=2, stop_early=True, intermediates_only=True,
                                              output_fmt="NLC")["image_intermediates"]
    return [visual["image_features"].double(), visual["image_intermediates"][0].double(),
            *(t.double() for t in last), model.encode_text(tokens).double()]


@torch.no_grad()
def test_clip_fused_blocks_equal_open_clips_blocks(clip):
    """SDPA (text: is_causal instead of the mask), the residual adds joined to the LayerNorms after
    them and the MLP's activation as one SiLU against open_clip's own blocks: to fp32 rounding in fp32, and in fp16 within twice the error of
    open_clip's model cast to fp16 (both against it in fp64)."""
    from mmfs_fast.encoders.attention import FusedSelfAttention
    from mmfs_fast.encoders.clip import FusedBlock, FusedTransformer, QuickGeluMLP

    assert isinstance(clip.model.visual.transformer, FusedTransformer) and isinstance(clip.model.transformer,
                                                                                     FusedTransformer)
    blocks = (*clip.model.visual.transformer.resblocks, *clip.model.transformer.resblocks)
    assert all(isinstance(b, FusedBlock) and isinstance(b.attn, FusedSelfAttention) and isinstance(b.mlp, QuickGeluMLP)
               and not b.training for b in blocks)
    pixels = clip.preprocess(images(2, 64, 64, seed=3))
    tokens = clip.tokenizer(["a pop art portrait", "an oil painting of a face"])
    ref = _clip_outputs(_reference_clip(clip, torch.float64), pixels.double(), tokens)
    for got, expected in zip(_clip_outputs(clip.model, pixels, tokens), ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    half = copy.deepcopy(clip.model).half()
    plain_half = _reference_clip(clip, torch.float16)
    for got, plain, expected in zip(_clip_outputs(half, pixels.half(), tokens),
                                    _clip_outputs(plain_half, pixels.half(), tokens), ref):
        error, plain_error = (got - expected).abs(), (plain - expected).abs()
        assert torch.isfinite(got).all()
        assert error.mean() <= 2 * plain_error.mean() and error.max() <= 2 * plain_error.max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_gpu_half_clip_runs_the_triton_blocks_within_twice_open_clips_error():
    """The Engine's CLIP on a GPU: fp16, add_layer_norm and linear_silu on their Triton kernels,
    SDPA's fused kernels; every output within twice the error of open_clip's own model in fp16,
    both against it in fp64."""
    from mmfs_fast.ops import _backend
    from mmfs_fast.ops.add_layer_norm import IMPLEMENTATIONS as ADD_LAYER_NORM
    from mmfs_fast.ops.linear_silu import IMPLEMENTATIONS as LINEAR_SILU

    torch.manual_seed(0)
    clip = CLIPEncoder(random_init=True, device="cuda", dtype=torch.float16)
    probe = torch.empty(2, 512, device="cuda", dtype=torch.float16)
    for name, implementations in (("add_layer_norm", ADD_LAYER_NORM), ("linear_silu", LINEAR_SILU)):
        assert _backend.resolve(name, "auto", implementations, probe) == "triton"
    pixels = clip.preprocess(images(2, 64, 64, seed=3).cuda())
    tokens = clip.tokenizer(["a pop art portrait", "an oil painting of a face"]).cuda()
    exact = _clip_outputs(_reference_clip(clip, torch.float64).cuda(), pixels.double(), tokens)
    plain = _clip_outputs(_reference_clip(clip, torch.float16).cuda(), pixels, tokens)
    for got, cast, expected in zip(_clip_outputs(clip.model, pixels, tokens), plain, exact):
        error, cast_error = (got - expected).abs(), (cast - expected).abs()
        assert torch.isfinite(got).all()
        assert error.mean() <= 2 * cast_error.mean() and error.max() <= 2 * cast_error.max()


@torch.no_grad()
def test_quick_gelu_mlp_follows_loaded_weights():
    """The pre-scaled c_fc bias is made again by load_state_dict: a block's MLP given other
    weights computes open_clip's MLP of those weights, x·σ(1.702x) in the middle."""
    from open_clip.transformer import QuickGELU

    from mmfs_fast.encoders.clip import QuickGeluMLP

    torch.manual_seed(0)
    plain = torch.nn.Sequential(collections.OrderedDict(
        c_fc=torch.nn.Linear(8, 32), gelu=QuickGELU(), c_proj=torch.nn.Linear(32, 8))).double()
    mlp = QuickGeluMLP(copy.deepcopy(plain))
    for p in plain.parameters():
        p.normal_()
    mlp.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    hidden = plain.c_fc(x)
    torch.testing.assert_close(mlp(x), plain.c_proj(hidden * torch.sigmoid(1.702 * hidden)))
    assert set(mlp.state_dict()) == set(plain.state_dict())
    with pytest.raises(ValueError, match="QuickGELU"):
        QuickGeluMLP(torch.nn.Sequential(collections.OrderedDict(
            c_fc=torch.nn.Linear(8, 32), gelu=torch.nn.GELU(), c_proj=torch.nn.Linear(32, 8))))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_attention_equals_multihead_attention(batch_first, causal):
    """Against nn.MultiheadAttention evaluated in fp64 (the causal one with its additive mask),
    batch of 3, with gradients w.r.t. the input (CLIP's losses take them)."""
    from mmfs_fast.encoders.attention import FusedSelfAttention

    torch.manual_seed(0)
    plain = torch.nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=batch_first).double().eval()
    fused = FusedSelfAttention(plain, causal)
    x = torch.randn((3, 7, 16) if batch_first else (7, 3, 16), dtype=torch.float64, requires_grad=True)
    mask = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1) if causal else None
    expected, = torch.autograd.grad(plain(x, x, x, need_weights=False, attn_mask=mask)[0].square().sum(), x)
    got = fused(x, x, x)[0]
    torch.testing.assert_close(got, plain(x, x, x, need_weights=False, attn_mask=mask)[0])
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0], expected)
    assert not fused.training
    with pytest.raises(ValueError, match="no dropout to train with"):
        fused.train()(x, x, x)


def test_fused_attention_refuses_what_it_does_not_compute():
    from mmfs_fast.encoders.attention import FusedSelfAttention

    attention = FusedSelfAttention(torch.nn.MultiheadAttention(8, 2, batch_first=True), causal=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="self-attention only"):
        attention(x, torch.randn(1, 3, 8), x)
    with pytest.raises(ValueError, match="causal one takes no explicit mask"):
        attention(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="padding mask"):
        attention(x, x, x, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))


def test_missing_or_bad_weights_are_clear_errors(tmp_path):
    for cls in (CLIPEncoder, DINOEncoder):
        with pytest.raises(EncoderWeightsError, match="local weights file"):
            cls()
        with pytest.raises(EncoderWeightsError, match="no such file"):
            cls(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"something": torch.zeros(3)}, junk)
    with pytest.raises(EncoderWeightsError, match="not usable"):
        DINOEncoder(junk)


def test_clip_weights_round_trip(clip, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = CLIPEncoder(path)
    x = images(1, 32, 32, seed=2)
    torch.testing.assert_close(loaded.encode_image(x), clip.encode_image(x), rtol=0, atol=0)


def test_dino_input_size():
    assert input_size(512, 512) == (224, 224)
    assert input_size(512, 1024) == (224, 448)
    assert input_size(600, 300) == (448, 224)
    assert input_size(100, 1000) == (224, 480)


def test_dino_keys_and_self_similarity(dino):
    x = images(2, 64, 64, seed=3)
    pre = dino.preprocess(x)
    # the official structure loss's resize: bilinear without antialiasing (the variant: tests/test_finetune_official.py)
    torch.testing.assert_close(pre, manual_preprocess(x, (224, 224), IMAGENET_MEAN, IMAGENET_STD, antialias=False),
                               rtol=0, atol=1e-6)
    captured = {}
    attn = dino.model.blocks[11].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    try:
        dino.model.forward_features(pre)
    finally:
        hook.remove()
    qkv = captured["qkv"]  # (B, N, 3·768), timm reshapes it to (B, N, 3, heads, head_dim)
    b, n, _ = qkv.shape
    expected = qkv.reshape(b, n, 3, attn.num_heads, -1)[:, :, 1].reshape(b, n, -1)
    keys = dino.keys(x)
    assert keys.shape == (2, 28 * 28 + 1, 768)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-4)

    sim = dino.self_similarity(x)
    assert sim.shape == (2, n, n)
    for i in (0, 5, n - 1):
        for j in (0, 17, n - 1):
            cos = F.cosine_similarity(keys[1, i], keys[1, j], dim=0)
            torch.testing.assert_close(sim[1, i, j], cos, rtol=1e-4, atol=1e-5)


def test_dino_weights_round_trip_from_dino_training_checkpoint(dino, tmp_path):
    path = tmp_path / "dino_full.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in dino.model.state_dict().items()}}, path)
    loaded = DINOEncoder(path)
    x = images(1, 32, 48, seed=4).requires_grad_(True)
    keys = loaded.keys(x)
    assert keys.shape == (1, 28 * 42 + 1, 768)
    torch.testing.assert_close(keys, dino.keys(x), rtol=0, atol=0)
    # frozen weights, gradients still reach the image
    keys.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loaded.model.parameters())
