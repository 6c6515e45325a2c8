"""Stage IV fine-tuning loop: learning, frozen parts, EMA, resume, real encoders and the CLI."""
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfs_fast.finetune import LOSS_READBACK, STATE_FILE, finetune
from mmfs_fast.models import Stylizer

STYLE_DIM = 32


class StandInCLIP:
    """Fixed random projections with the CLIPEncoder interface, fast enough for many steps."""

    def __init__(self, dim=STYLE_DIM, token_dim=64):
        g = torch.Generator().manual_seed(1)
        self.proj = torch.randn(dim, 3 * 8 * 8, generator=g)
        self.token_proj = torch.randn(token_dim, 3 * 4 * 4, generator=g)
        self.dim = dim

    def encode_image(self, x):
        small = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(small.flatten(1) @ self.proj.T, dim=-1)

    def encode_image_and_tokens(self, x):
        patches = F.unfold(F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False), 4, stride=4)
        return self.encode_image(x), torch.tanh(patches.transpose(1, 2) @ self.token_proj.T)  # (B, 49, 64)

    def encode_text(self, texts):
        seeds = [sum(map(ord, t)) for t in texts]
        return F.normalize(torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(s))
                                        for s in seeds]), dim=-1)


class StandInDINO:
    """Cosine self-similarity of a fixed random strided conv's features."""

    def __init__(self, interrupt_after=None):
        self.weight = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        self.calls, self.interrupt_after = 0, interrupt_after

    def self_similarity(self, x):
        self.calls += 1
        if self.calls == self.interrupt_after:
            raise KeyboardInterrupt
        k = F.normalize(F.conv2d(x, self.weight, stride=8).flatten(2).transpose(1, 2), dim=-1)
        return k @ k.transpose(1, 2)


@pytest.fixture(scope="module")
def stylizer():
    torch.manual_seed(0)
    return Stylizer(size=64, ngf=4, style_dim=STYLE_DIM)


@pytest.fixture(scope="module")
def faces():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1


def run(stylizer, faces, dino=None, **kw):
    kw = {"text": "pop art", "batch_size": 2, "lr": 2e-3, "decay_steps": 0, "progress": False, **kw}
    return finetune(stylizer, StandInCLIP(), dino or StandInDINO(), faces, **kw)


def split_params(model):
    frozen = ("encoder.", "mapping_z.", "clip_mapper.")
    state = model.state_dict()
    return ({k: v for k, v in state.items() if k.startswith(frozen)},
            {k: v for k, v in state.items() if not k.startswith(frozen) and not k.endswith("kernel")})


def test_ten_steps_reduce_the_loss_and_train_only_the_decoder(stylizer, faces):
    before = {k: v.clone() for k, v in stylizer.state_dict().items()}
    result = run(stylizer, faces[:2], steps=10)
    totals = [h["total"] for h in result.history]
    assert len(totals) == 10 and set(result.history[0]) == {"total", "structure", "clip", "lr"}
    assert sum(totals[-3:]) / 3 < totals[0] - 0.1
    frozen, decoder = split_params(result.stylizer)
    assert all(torch.equal(v, before[k]) for k, v in frozen.items())
    assert all(not torch.equal(v, before[k]) for k, v in decoder.items() if "noise" not in k)
    # the caller's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in stylizer.state_dict().items())


def test_ema_arithmetic(stylizer, faces):
    theta = [split_params(stylizer)[1]] + [split_params(run(stylizer, faces, steps=n, ema=0.0).stylizer)[1]
                                           for n in (1, 2)]
    ema = split_params(run(stylizer, faces, steps=2, ema=0.99).stylizer)[1]
    for k in ema:
        by_hand = (theta[0][k] * 0.99 + theta[1][k] * (1 - 0.99)) * 0.99 + theta[2][k] * (1 - 0.99)
        torch.testing.assert_close(ema[k], by_hand, rtol=1e-6, atol=1e-9)


def test_resume_after_an_interruption_is_bit_exact(stylizer, faces, tmp_path):
    """Mid-run, with the official schedule's decay and the train-mode clip_mapper's dropout."""
    official = {"steps": 2, "decay_steps": 2}
    reference = run(stylizer, faces, ref_image=faces[0], text=None, **official)
    assert set(reference.history[0]) == {"total", "structure", "clip", "projection", "lr"}
    # one DINO call per face chunk, then one per step: interrupted during step 4, saved after step 2
    interrupting = StandInDINO(interrupt_after=2 + 4)
    with pytest.raises(KeyboardInterrupt):
        run(stylizer, faces, dino=interrupting, ref_image=faces[0], text=None, checkpoint_dir=tmp_path,
            checkpoint_every=2, **official)
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2
    resumed = run(stylizer, faces, ref_image=faces[0], text=None, checkpoint_dir=tmp_path, checkpoint_every=2,
                  **official)
    assert resumed.history == reference.history
    for (k, a), b in zip(resumed.stylizer.state_dict().items(), reference.stylizer.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="another prompt or settings"):
        run(stylizer, faces, ref_image=faces[0], text=None, lr=1e-3, checkpoint_dir=tmp_path, **official)


def test_losses_read_back_in_batches_lose_no_step(stylizer, faces, tmp_path):
    """LOSS_READBACK steps per device→host copy; checkpoints and the last step flush the rest."""
    steps = LOSS_READBACK + 3
    plain = run(stylizer, faces, steps=steps)
    saved = run(stylizer, faces, steps=steps, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert len(plain.history) == steps and saved.history == plain.history
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["history"] == plain.history


def test_clear_errors(stylizer, faces, tmp_path):
    for prompt in ({"text": "  "}, {"text": None}, {"text": "a", "ref_image": faces[0]}):
        with pytest.raises(ValueError, match="prompt"):
            run(stylizer, faces, steps=1, **prompt)
    for bad, message in (({"decay_steps": -1}, "decay_steps"), ({"steps": 0}, "steps"), ({"ema": 1.0}, "ema"),
                         ({"capture": True}, "CUDA")):
        with pytest.raises(ValueError, match=message):
            run(stylizer, faces, **{"steps": 1, **bad})
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        run(stylizer, faces, text=None, ref_image=junk, steps=1)
    with pytest.raises(ValueError, match="clip_mapper"):
        run(Stylizer(size=64, ngf=4, style_dim=STYLE_DIM, clip_mapper=False), faces, steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        run(stylizer, tmp_path / "empty", steps=1)
    with pytest.warns(UserWarning, match="reused"):
        result = run(stylizer, faces[:1], steps=1, batch_size=3)
    assert len(result.history) == 1


def save_png(path, seed):
    pixels = torch.randint(0, 256, (48, 40, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_cli_one_shot_with_real_encoders(tmp_path, capsys):
    """Random-initialised ViT-B CLIP and DINO, a style_dim-512 tiny Stylizer, one step (the
    variants' flags: no decay, fixed style, antialiased DINO input)."""
    from mmfs_fast.cli import main

    torch.manual_seed(0)
    model = Stylizer(size=64, ngf=4, style_dim=512)
    model.save(tmp_path / "tiny.safetensors")
    (tmp_path / "faces").mkdir()
    save_png(tmp_path / "faces" / "face.png", 0)
    ref = save_png(tmp_path / "style.png", 9)
    out = tmp_path / "tuned.pt"
    code = main(["finetune", "--ckpt", str(tmp_path / "tiny.safetensors"), "--faces", str(tmp_path / "faces"),
                 "--ref", str(ref), "--steps", "1", "--decay-steps", "0", "--fixed-style", "--dino-antialias",
                 "--batch-size", "1", "--out", str(out), "--random-init",
                 "--preview", str(tmp_path / "preview.png"), "--device", "cpu"])
    assert code == 0
    assert re.search(r"1 steps, [0-9.]+ steps/s; saved", capsys.readouterr().err)
    tuned = Stylizer.from_checkpoint(out)
    assert set(torch.load(out, weights_only=True)) == {"G_ema_model"}
    frozen, decoder = split_params(tuned)
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, original[k]) for k, v in decoder.items())
    assert Image.open(tmp_path / "preview.png").size == (64, 2 * 64)


def test_cli_missing_weights_is_a_usage_error(tmp_path, capsys):
    from mmfs_fast.cli import main

    Stylizer(size=64, ngf=4, style_dim=512).save(tmp_path / "tiny.safetensors")
    code = main(["finetune", "--ckpt", str(tmp_path / "tiny.safetensors"), "--faces", str(tmp_path),
                 "--text", "pop art", "--out", str(tmp_path / "out.safetensors")])
    assert code == 2
    assert "CLIP needs a local weights file" in capsys.readouterr().err


def test_result_saves_as_safetensors(stylizer, faces, tmp_path):
    result = run(stylizer, faces, steps=1)
    path = result.save(tmp_path / "tuned.safetensors")
    loaded = Stylizer.from_checkpoint(path)
    for (k, a), b in zip(loaded.state_dict().items(), result.stylizer.state_dict().values()):
        assert torch.equal(a, b), k
