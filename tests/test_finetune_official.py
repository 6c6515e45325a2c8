"""Fine-tuning against the official fine-tune, re-computed here from its formulas (not from
mmfs_fast.losses): the DINO resize, the train-mode w+ per step, the 209-step schedule, the
loss total; the fast path against the fp32 reference; a step without host syncs.

Random-initialised small CLIP and DINO of the real wrappers (the reduced bench profile's)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

from mmfs_fast import benchmark as mb
from mmfs_fast import finetune as ft
from mmfs_fast.models import Stylizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 64


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    clip = mb.build_models(mb.REDUCED, "cpu")[1]
    return clip, mb.build_dino(mb.REDUCED, "cpu")


@pytest.fixture(scope="module")
def stylizer():
    torch.manual_seed(1)
    return Stylizer(size=SIZE, ngf=4, style_dim=512)


@pytest.fixture(scope="module")
def faces():
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1


def new_run(stylizer, encoders, faces, prompt="text", seed=0, **settings):
    clip, dino = encoders
    torch.manual_seed(seed)
    ref = {"text": dict(text="pop art"), "image": dict(ref_image=faces[:1].flip(-1))}[prompt]
    settings = ft.FinetuneSettings(**{"batch_size": 2, "lr": 2e-3, **settings})
    return ft.FinetuneRun(stylizer, clip, dino, faces, ft.encode_prompt(clip, **ref), settings)


# -- the official formulas, re-computed ----------------------------------------------------
def official_dino_self_sim(vit, image01):
    """The official structure loss's key self-similarity of one [0, 1] image (its torchvision
    Resize(224, max_size=480) without antialiasing, ImageNet normalisation, keys of the last
    block with the heads concatenated, cosine similarity)."""
    x = TF.normalize(TF.resize(image01, 224, max_size=480, antialias=False), IMAGENET_MEAN, IMAGENET_STD)
    captured = {}
    attn = vit.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    try:
        vit.forward_features(x[None])
    finally:
        hook.remove()
    qkv = captured["qkv"]
    b, n, _ = qkv.shape
    keys = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1]  # (1, heads, N, d)
    keys = keys.transpose(1, 2).reshape(b, n, -1)[0]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys @ keys.T


def official_structure_loss(vit, fake, source):
    """Σ over the batch of MSE(S(fake), S(source)), one image at a time as the official loop does."""
    return sum(F.mse_loss(official_dino_self_sim(vit, b * 0.5 + 0.5), official_dino_self_sim(vit, a * 0.5 + 0.5))
               for a, b in zip(source, fake))


def official_clip(model, images):
    """(n(CLIP(x)), block-3 tokens without CLS) with the official preprocess_clip_image."""
    x = F.interpolate(images * 0.5 + 0.5, (224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = TF.normalize(x, CLIP_MEAN, CLIP_STD)
    captured = {}
    hook = model.visual.transformer.resblocks[3].register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
    try:
        feats = model.encode_image(x)
    finally:
        hook.remove()
    return feats / feats.norm(dim=1, keepdim=True), captured["t"][:, 1:]  # open_clip is batch-first


def official_uut(tokens):
    tokens = tokens / tokens.norm(dim=2, keepdim=True)
    u, _, _ = torch.linalg.svd(tokens.reshape(-1, tokens.shape[2]).T, full_matrices=False)
    return u @ u.T


def official_lrs(lr, n_epochs, n_epochs_decay):
    """The lr of each step of the official loop: train.py's epoch_as_iter loop (stops when
    total_iters reaches n_epochs + n_epochs_decay) with the 'linear' LambdaLR stepped after each."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda epoch: 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1))
    lrs, total_iters = [], 0
    while True:
        total_iters += 1
        if total_iters >= n_epochs + n_epochs_decay:
            return lrs
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


# -- the three official behaviours -----------------------------------------------------------
def test_dino_resizes_without_antialiasing_by_default_and_the_variant_antialiases(encoders):
    """At 512² (antialiasing only acts when shrinking): the official resize by default, the
    antialiased one as the variant, and the two differ."""
    _, dino = encoders
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(4)) * 2 - 1
    fake = faces.flip(-2)
    ours = ft.structure_loss(dino.self_similarity(fake), dino.self_similarity(faces))
    official = official_structure_loss(dino.model, fake, faces)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-7)
    dino.antialias = True
    try:
        antialiased = ft.structure_loss(dino.self_similarity(fake), dino.self_similarity(faces))
        x = F.interpolate(faces * 0.5 + 0.5, (224, 224), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(dino.preprocess(faces), TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD),
                                   rtol=0, atol=1e-6)
    finally:
        dino.antialias = False
    assert abs(antialiased - official) > 1e-3 * official


def record_styles(run, monkeypatch):
    """Each step's w+ and the RNG state the clip_mapper started from."""
    seen = []
    map_clip = run.model.map_clip

    def recording(embedding):
        state = torch.get_rng_state()
        w_plus = map_clip(embedding)
        seen.append((state, w_plus.clone()))
        return w_plus

    monkeypatch.setattr(run.model, "map_clip", recording)
    decode = run.model.decode
    monkeypatch.setattr(run.model, "decode", lambda feat, w_plus, **kw: seen.append(w_plus.clone()) or
                        decode(feat, w_plus, **kw))
    return seen


def test_w_plus_from_the_train_mode_mapper_every_step(stylizer, encoders, faces, monkeypatch):
    run = new_run(stylizer, encoders, faces)
    seen = record_styles(run, monkeypatch)
    run.step()
    run.step()
    (state1, w1), decoded1, (_, w2), decoded2 = seen
    assert torch.equal(decoded1, w1) and torch.equal(decoded2, w2)
    # CLIPFeats2Wplus in training mode on the normalised prompt embedding, one row per sample
    mapper = run.model.clip_mapper
    assert mapper.training
    embedding = run.prompt.embedding / run.prompt.embedding.norm(dim=1, keepdim=True)
    x_in = embedding.repeat(2, 1).view(2, 1, -1) + mapper.position_embedding
    torch.set_rng_state(state1)
    with torch.no_grad():
        official = F.leaky_relu(mapper.transformer(x_in.permute(1, 0, 2)), negative_slope=0.2)
    torch.testing.assert_close(w1, official.permute(1, 0, 2), rtol=1e-5, atol=1e-6)
    # dropout: another style for each sample and each step, around the eval-mode one
    assert not torch.allclose(w1[0], w1[1]) and not torch.allclose(w1, w2)
    assert (w1 - run.w_plus).abs().mean() < 0.5 * run.w_plus.abs().mean()


def test_fixed_style_is_the_eval_mode_mapper_once(stylizer, encoders, faces, monkeypatch):
    run = new_run(stylizer, encoders, faces, fixed_style=True)
    seen = record_styles(run, monkeypatch)
    run.step()
    run.step()
    assert len(seen) == 2  # decode only: no mapper in the step
    with torch.no_grad():
        expected = stylizer.clip_mapper.eval()(run.prompt.embedding)
    for w_plus in seen:
        torch.testing.assert_close(w_plus, expected.expand(2, -1, -1), rtol=0, atol=0)


def test_the_official_209_step_schedule_and_constant_lr():
    settings = ft.FinetuneSettings()
    ours = [settings.lr_at(i) for i in range(settings.total_steps)]
    official = official_lrs(2e-4, 200, 10)
    assert len(ours) == len(official) == 209
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    assert ours[199] == 2e-4 and ours[200] == pytest.approx(2e-4 * 10 / 11) and ours[-1] == pytest.approx(2e-4 * 2 / 11)
    constant = ft.FinetuneSettings(steps=7, decay_steps=0)
    assert [constant.lr_at(i) for i in range(constant.total_steps)] == [2e-4] * 7


def test_a_run_steps_with_the_official_lrs(stylizer, encoders, faces, monkeypatch):
    run = new_run(stylizer, encoders, faces, steps=2, decay_steps=3)
    used = []
    step = run.optimizer.step
    monkeypatch.setattr(run.optimizer, "step", lambda: used.append(float(run.optimizer.param_groups[0]["lr"])) or step())
    for _ in range(run.settings.total_steps):
        run.step()
    assert used == pytest.approx(official_lrs(2e-3, 2, 4), rel=1e-6)


@pytest.mark.parametrize("prompt", ["text", "image"])
def test_step_losses_are_the_official_formulas(stylizer, encoders, faces, prompt, monkeypatch):
    """Every term re-computed from the step's own fakes and batch; total = 0.5·st + 1·clip (+ 100·proj);
    the directional term is n(CLIP(fake)) − n(CLIP(face)), fake first."""
    clip, dino = encoders
    run = new_run(stylizer, encoders, faces, prompt=prompt, batch_size=3)
    seen = {}
    draw = ft.batch_indices
    monkeypatch.setattr(ft, "batch_indices", lambda *a: seen.setdefault("idx", draw(*a)))
    decode = run.model.decode
    monkeypatch.setattr(run.model, "decode", lambda *a, **kw: seen.setdefault("fake", decode(*a, **kw)))
    losses = run.step()
    fake, x = seen["fake"].detach(), faces[seen["idx"]]
    with torch.no_grad():
        structure = official_structure_loss(dino.model, fake, x)
        fake_feats, fake_tokens = official_clip(clip.model, fake)
        real_feats, _ = official_clip(clip.model, x)
        if prompt == "text":
            text = clip.encode_text(["pop art"])
            direction = text - clip.encode_text(["photo"])
        else:
            ref_feats, ref_tokens = official_clip(clip.model, faces[:1].flip(-1))
            direction = ref_feats - real_feats.mean(dim=0, keepdim=True)
        clip_loss = (1 - F.cosine_similarity(fake_feats - real_feats, direction.expand_as(real_feats), dim=1)).mean()
        swapped = (1 - F.cosine_similarity(real_feats - fake_feats, direction.expand_as(real_feats), dim=1)).mean()
        expected = [0.5 * structure + 1.0 * clip_loss, structure, clip_loss]
        if prompt == "image":
            tokens = fake_tokens / fake_tokens.norm(dim=2, keepdim=True)
            tokens = tokens.reshape(-1, tokens.shape[2]).T
            projection = F.l1_loss(official_uut(ref_tokens) @ tokens, tokens)
            expected = [expected[0] + 100.0 * projection, structure, clip_loss, projection]
    torch.testing.assert_close(losses, torch.stack(expected), rtol=2e-4, atol=1e-6)
    assert abs(swapped - losses[2]) > 1e-3  # the other order would be caught


# -- the fast path --------------------------------------------------------------------------------
class FailOnHostSync(TorchDispatchMode):
    """Fails on the ops that copy a device value to the host (which a CUDA graph cannot capture)."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"host sync in the step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prompt", ["text", "image"])
def test_a_step_makes_no_host_sync(stylizer, encoders, faces, prompt):
    run = new_run(stylizer, encoders, faces, prompt=prompt, mixed_precision=True)
    run.step()  # the first step creates Adam's state
    with FailOnHostSync():
        losses = run.step()
    assert torch.isfinite(losses).all()
    with pytest.raises(AssertionError, match="host sync"), FailOnHostSync():
        losses.sum().item()  # the mode does catch one


def test_fast_path_follows_the_fp32_reference(stylizer, encoders, faces):
    """20 steps from one seed: the fast path (unfused modulated convolution, constants once; in
    fp32 and in bf16 autocast) against the reference (fp32, per-sample weights, faces re-encoded
    each step). Tolerances (measured: 1.6e-4 and 2.2e-3): each step's total within 1e-3 (fp32)
    and 1 % (bf16) of the reference's, the results' renders within 1e-3 and 5e-3 on average."""
    steps = 20
    clip, dino = encoders
    results = {}
    for fast, bf16 in ((False, False), (True, False), (True, True)):
        results[fast, bf16] = ft.finetune(stylizer, clip, dino, faces, text="pop art", steps=steps, decay_steps=0,
                                          batch_size=2, lr=2e-3, fast=fast, mixed_precision=bf16, progress=False)
    reference = results.pop((False, False))
    ref_curve = [h["total"] for h in reference.history]
    assert len(ref_curve) == steps and ref_curve[-1] < 0.9 * ref_curve[0]  # the reference does learn
    with torch.no_grad():
        w_plus = reference.w_plus.expand(len(faces), -1, -1)
        ref_render = reference.stylizer(faces, w_plus=w_plus, noise="zero")
        for (_, bf16), result in results.items():
            curve = [h["total"] for h in result.history]
            relative = max(abs(a - b) / b for a, b in zip(curve, ref_curve))
            assert relative < (1e-2 if bf16 else 1e-3), (bf16, relative)
            render = result.stylizer(faces, w_plus=w_plus, noise="zero")
            assert (render - ref_render).abs().mean() < (5e-3 if bf16 else 1e-3), bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("prompt", ["text", "image"])
def test_captured_steps_follow_eager_steps_on_cuda(prompt):
    """The CUDA graph replays the step: after capture, the loss curve of a captured run stays
    within bf16 noise of an eager one from the same start."""
    clip = mb.build_models(mb.REDUCED, "cuda")[1]
    dino = mb.build_dino(mb.REDUCED, "cuda")
    torch.manual_seed(1)
    stylizer = Stylizer(size=SIZE, ngf=4, style_dim=512).cuda()
    faces = (torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1).cuda()
    curves = {}
    for capture in (True, False):
        run = new_run(stylizer, (clip, dino), faces, prompt=prompt, capture=capture, steps=8, decay_steps=2)
        curves[capture] = torch.stack([run.step() for _ in range(run.settings.total_steps)])[:, 0].tolist()
        assert (run.graph is not None) == capture
    assert all(math.isfinite(v) for v in curves[True])
    assert curves[True] == pytest.approx(curves[False], rel=0.1)  # dropout and noise draws differ
