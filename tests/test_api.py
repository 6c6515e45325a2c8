"""The embedding API (mmfs_fast.MMFS) and image io, on a tiny 64² Stylizer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfs_fast import MMFS, Stylizer, io
from mmfs_fast.engine import Engine
from mmfs_fast.models import N_LATENT, StylizerConfig

SIZE, DIM = 64, 32


def lanczos_tensor(img: Image.Image, size: int = SIZE) -> torch.Tensor:
    """SPEC §1 written out: RGB, LANCZOS resize, x / 127.5 - 1, CHW."""
    a = np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float64)
    return torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1).float()


def random_photo(seed: int, w: int = 90, h: int = 70) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = Stylizer(size=SIZE, ngf=4, style_dim=DIM)
    with torch.no_grad():  # noise strengths start at zero; make the noise matter
        for name, p in model.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def mmfs(ckpt):
    return MMFS.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def reference(ckpt):
    """The checkpoint as a plain Stylizer on the ref ops: what the engine-backed MMFS must match."""
    return Stylizer.from_checkpoint(ckpt, impl="ref")


@pytest.fixture(scope="module")
def faces():
    return [random_photo(i) for i in range(3)]


class StandInCLIP:
    """CLIP's interface with cheap deterministic features of the right width."""

    def __init__(self, dim):
        self.proj = torch.randn(3, dim, generator=torch.Generator().manual_seed(1))
        self.dim = dim

    def encode_text(self, texts):
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)

    def encode_image(self, x):
        return F.normalize(x.float().mean(dim=(2, 3)) @ self.proj, dim=-1)

    def encode_pil(self, images):
        return self.encode_image(torch.stack([lanczos_tensor(img, 8) for img in images]))


def test_loads_model_size_from_checkpoint(mmfs):
    assert (mmfs.size, mmfs.style_dim, mmfs.device.type, mmfs.dtype) == (SIZE, DIM, "cpu", torch.float32)


def test_explicit_w_plus_equals_stylizer_forward(mmfs, reference, faces):
    w = torch.randn(len(faces), N_LATENT, DIM)
    x = torch.stack([lanczos_tensor(f) for f in faces])
    with torch.no_grad():
        want = reference(x, w_plus=w, noise="zero")
    got = mmfs.stylize(faces, w_plus=w, noise="zero", batch_size=2)
    torch.testing.assert_close(got, want)
    # one style (batch 1) applies to every face
    got_one = mmfs.stylize(faces, w_plus=w[1], noise="zero")
    with torch.no_grad():
        torch.testing.assert_close(got_one[0], reference(x[:1], w_plus=w[1:2], noise="zero")[0])


def test_inputs_paths_arrays_tensors_agree(mmfs, faces, tmp_path):
    path = tmp_path / "face.png"
    faces[0].save(path)
    w = mmfs.style_from_seed(0)
    outs = [mmfs.stylize([src], w_plus=w, noise="zero")
            for src in (faces[0], str(path), np.asarray(faces[0]), lanczos_tensor(faces[0]))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    pil = mmfs.stylize(faces[:1], w_plus=w, noise="zero", output="pil")
    assert pil[0].size == (SIZE, SIZE) and pil[0].mode == "RGB"


def test_seed_reproducible_and_independent_of_batching(mmfs, reference, faces):
    a = mmfs.stylize(faces, seed=7, batch_size=1)
    b = mmfs.stylize(faces, seed=7, batch_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # batched conv rounding
    assert not torch.allclose(a, mmfs.stylize(faces, seed=8))
    assert not torch.allclose(a, mmfs.stylize(faces, seed=7, noise="zero"))  # noise is drawn and matters
    # the seed's style is mapping(z), z ~ N(0, I) from a CPU generator seeded with it
    z = torch.randn(1, DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference.mapping_z(z)[:, None].expand(1, N_LATENT, DIM)
    torch.testing.assert_close(mmfs.style_from_seed(7), want)
    torch.testing.assert_close(mmfs.style_from_seed([7, 7])[1], want[0])


def test_text_and_reference_styles_through_clip(ckpt, faces, tmp_path):
    clip = StandInCLIP(DIM)
    mmfs = MMFS(Stylizer.from_checkpoint(ckpt), clip)
    text_w = mmfs.style_from_text("a watercolor portrait")
    torch.testing.assert_close(text_w, mmfs.stylizer.map_clip(clip.encode_text(["a watercolor portrait"])))
    x = torch.stack([lanczos_tensor(f) for f in faces])
    torch.testing.assert_close(mmfs.stylize(faces, text="a watercolor portrait", noise="zero"),
                               mmfs.stylizer(x, clip_feats=clip.encode_text(["a watercolor portrait"] * 3),
                                             noise="zero"))
    ref = Image.fromarray(np.asarray(random_photo(5))).convert("RGBA")
    ref.putalpha(255)
    path = tmp_path / "ref.png"
    ref.save(path)
    want = mmfs.stylizer.map_clip(clip.encode_pil([ref.convert("RGB")]))
    torch.testing.assert_close(mmfs.style_from_image(path), want)
    torch.testing.assert_close(mmfs.style(ref=str(path)), want)
    torch.testing.assert_close(mmfs.style_from_image(x[:2]), mmfs.stylizer.map_clip(clip.encode_image(x[:2])))


def test_random_init_with_the_real_clip():
    torch.manual_seed(0)
    stylizer = Stylizer(size=32, ngf=4, style_dim=512, n_mlp=2)  # CLIP features are 512-wide
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED CLIP"):
        mmfs = MMFS(stylizer, random_clip=True)
        text_w = mmfs.style_from_text(["a sketch", "an oil painting"])
    clip = mmfs.clip
    torch.testing.assert_close(text_w, stylizer.map_clip(clip.encode_text(["a sketch", "an oil painting"])))
    assert not torch.allclose(text_w[0], text_w[1])
    photo = random_photo(3, 40, 40)
    torch.testing.assert_close(mmfs.style_from_image(photo), stylizer.map_clip(clip.encode_pil([photo])))
    out = mmfs.stylize([photo], text="a sketch", seed=1)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_engine_styles_are_the_reference_path_styles_without_a_second_stylizer(ckpt, mmfs):
    assert mmfs.stylizer is mmfs.engine.model
    assert not any(isinstance(v, torch.nn.Module) for v in vars(mmfs).values())  # no Stylizer of its own
    plain = MMFS.load(ckpt, device="cpu", engine=False)
    torch.testing.assert_close(mmfs.style_from_seed([3, 4]), plain.style_from_seed([3, 4]))
    clip, stylizer = StandInCLIP(DIM), Stylizer.from_checkpoint(ckpt)
    ref = random_photo(6)
    with_engine = MMFS(stylizer, clip, engine=Engine(stylizer, device="cpu"))
    torch.testing.assert_close(with_engine.style_from_image(ref), stylizer.map_clip(clip.encode_pil([ref])))


def test_random_clip_styles_on_the_engine():
    config = StylizerConfig(size=32, ngf=4, style_dim=512, n_mlp=2)  # CLIP features are 512-wide
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        fast = MMFS.load(random_init=True, config=config, device="cpu")
        plain = MMFS.load(random_init=True, config=config, device="cpu", engine=False)
        text_w = fast.style_from_text(["a sketch", "an oil painting"])
        want = plain.style_from_text(["a sketch", "an oil painting"])
    torch.testing.assert_close(text_w, want)
    assert fast.engine.text_cache.stats()["misses"] == 2  # computed on the engine
    photo = random_photo(3, 40, 40)
    torch.testing.assert_close(fast.style_from_image(photo), plain.style_from_image(photo))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(fast.style_from_image(x), plain.style_from_image(x))


def test_clip_styles_without_clip_say_what_to_do(mmfs):
    with pytest.raises(RuntimeError, match="clip_weights"):
        mmfs.style_from_text("a sketch")


def test_mix_and_interpolate_closed_form():
    a, b = torch.randn(2, N_LATENT, DIM), torch.randn(1, N_LATENT, DIM)
    mixed = MMFS.mix(a, b, 4)
    assert mixed.shape == (2, N_LATENT, DIM)
    for i in range(N_LATENT):
        torch.testing.assert_close(mixed[:, i], a[:, i] if i < 4 else b[:, i].expand(2, -1))
    torch.testing.assert_close(MMFS.mix(a, b, 0), b.expand(2, -1, -1))
    torch.testing.assert_close(MMFS.mix(a, b, N_LATENT), a)
    with pytest.raises(ValueError, match="crossover"):
        MMFS.mix(a, b, 11)
    torch.testing.assert_close(MMFS.interpolate(a, b, 0.0), a)
    torch.testing.assert_close(MMFS.interpolate(a, b, 1.0), b.expand(2, -1, -1))
    torch.testing.assert_close(MMFS.interpolate(a, b, 0.25), 0.75 * a + 0.25 * b)


def test_style_errors(mmfs, faces):
    with pytest.raises(ValueError, match="one style source"):
        mmfs.style(text="x", w_plus=torch.zeros(1, N_LATENT, DIM))
    with pytest.raises(ValueError, match="shape"):
        mmfs.stylize(faces, w_plus=torch.zeros(1, 9, DIM))
    with pytest.raises(ValueError, match="NaN"):
        mmfs.stylize(faces, w_plus=torch.full((1, N_LATENT, DIM), float("nan")))
    with pytest.raises(ValueError, match="2 styles for 3 images"):
        mmfs.stylize(faces, w_plus=torch.zeros(2, N_LATENT, DIM))
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        mmfs.stylize([torch.zeros(3, 32, 32)], seed=0)
    with pytest.raises(TypeError, match="seed"):
        mmfs.style_from_seed(1.5)


def test_load_requires_weights_or_explicit_random_init():
    with pytest.raises(ValueError, match="random_init=True"):
        MMFS.load()
    config = Stylizer(size=32, ngf=4, style_dim=16).config
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        a = MMFS.load(random_init=True, config=config, device="cpu")
    with pytest.warns(UserWarning):
        b = MMFS.load(random_init=True, config=config, device="cpu")
    for pa, pb in zip(a.stylizer.parameters(), b.stylizer.parameters()):
        torch.testing.assert_close(pa, pb)  # repeatable demos


def test_unreadable_inputs_raise_or_are_skipped(mmfs, faces, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(io.ImageError, match="bad.png: not an image"):
        mmfs.stylize([faces[0], bad], seed=0)
    results = list(mmfs.stylize_iter([faces[0], bad, faces[1]], seed=0, skip_errors=True, batch_size=2))
    assert [i for i, _ in results] == [0, 1, 2]
    assert isinstance(results[1][1], io.ImageError)
    torch.testing.assert_close(torch.stack([results[0][1], results[2][1]]), mmfs.stylize(faces[:2], seed=0))


# -- io ---------------------------------------------------------------------------
def test_load_image_is_spec_preprocessing(tmp_path):
    img = random_photo(1, 120, 100)
    path = tmp_path / "x.png"
    img.save(path)
    torch.testing.assert_close(io.load_image(path, SIZE), lanczos_tensor(img), rtol=0, atol=1e-6)


def test_image_modes(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom transparent → white
    x = io.load_image(Image.fromarray(rgba), 8)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[:, 7, 0], torch.ones(3))

    gray16 = np.array([[0, 65535], [32896, 257]], np.uint16)  # 16-bit scaled, not clipped
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as png:
        assert png.mode.startswith("I")
    want = torch.tensor([[0, 255], [128, 1]]) / 127.5 - 1
    torch.testing.assert_close(io.load_image(tmp_path / "g16.png", 2), want.expand(3, 2, 2))
    torch.testing.assert_close(io.load_image(gray16, 2), want.expand(3, 2, 2))

    cmyk = random_photo(2, 16, 16).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as jpg:
        torch.testing.assert_close(io.load_image(tmp_path / "c.jpg", 16), lanczos_tensor(jpg.convert("RGB"), 16))
    gray = random_photo(3, 16, 16).convert("L")
    x = io.load_image(gray, 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    torch.testing.assert_close(io.load_image(random_photo(4, 16, 16).convert("P"), 16),
                               lanczos_tensor(random_photo(4, 16, 16).convert("P").convert("RGB"), 16))
    torch.testing.assert_close(io.load_image(np.ones((4, 4)), 4), torch.ones(3, 4, 4))  # float in [0, 1]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "not an image|corrupt"),
    (lambda p: p.write_text("hello"), "not an image"),
    (lambda p: p.write_bytes(_png_bytes()[:300]), "corrupt or truncated"),
    (lambda p: None, "no such file"),
    (lambda p: Image.new("L", (200, 100)).save(p), "20000 pixels exceeds the limit of 10000"),
])
def test_bad_files_give_one_clear_error(tmp_path, make, message):
    path = tmp_path / "input.png"
    make(path)
    with pytest.raises(io.ImageError, match=message) as e:
        io.load_image(path, 8, max_pixels=10_000)
    assert str(path) in str(e.value)


def _png_bytes() -> bytes:
    import io as bytes_io

    buf = bytes_io.BytesIO()
    random_photo(0, 64, 64).save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limit_from_environment(monkeypatch):
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "99")
    with pytest.raises(io.ImageError, match="limit of 99"):
        io.load_image(Image.new("RGB", (10, 10)), 8)


def test_bad_arrays():
    with pytest.raises(io.ImageError, match="shape"):
        io.load_image(np.zeros((4, 4, 2), np.uint8), 4)
    with pytest.raises(io.ImageError, match="dtype"):
        io.load_image(np.zeros((4, 4), np.int64), 4)
    with pytest.raises(io.ImageError, match=r"\[0, 1\]"):
        io.load_image(np.full((4, 4), 2.0), 4)


def test_save_image_formula_and_round_trip(tmp_path):
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 6).expand(3, 1, 6)
    io.save_image(x, tmp_path / "sub" / "x.png")
    pixels = np.asarray(Image.open(tmp_path / "sub" / "x.png"))
    assert pixels[0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]  # round(clamp(x/2 + 1/2, 0, 1) * 255)
    y = torch.rand(3, 16, 16) * 2 - 1
    io.save_image(y, tmp_path / "y.png")
    torch.testing.assert_close(io.load_image(tmp_path / "y.png", 16), y, rtol=0, atol=1 / 255 + 1e-6)


def test_engine_renders_like_the_reference_path(ckpt, mmfs, faces):
    assert mmfs.engine is not None
    plain = MMFS.load(ckpt, device="cpu", engine=False)
    assert plain.engine is None
    want = plain.stylize(faces, seed=2)
    torch.testing.assert_close(mmfs.stylize(faces, seed=2), want)
    bf16 = MMFS.load(ckpt, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.float32  # styles stay fp32; the Engine renders in bf16
    error = (bf16.stylize(faces, seed=2) - want).abs().mean()
    assert 0 < error < 0.02  # bf16 rounding: near, not equal
    with pytest.raises(ValueError, match="unsupported dtype"):
        MMFS.load(ckpt, device="cpu", dtype="float64")


def test_noise_modes_random_fixed_zero(mmfs, reference, faces):
    """NOISE_MODES, one vocabulary: "random" one draw per face, "fixed" one draw for every face."""
    from mmfs_fast.models.noise import NOISE_MODES, make_noises

    assert NOISE_MODES == ("random", "fixed", "zero")
    same = [faces[0]] * 3
    fixed = mmfs.stylize(same, seed=4, noise="fixed", batch_size=2)
    torch.testing.assert_close(fixed[1:], fixed[:1].expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    drawn = mmfs.stylize(same, seed=4, noise="random")
    assert not torch.allclose(drawn[0], drawn[1])
    # "fixed" is the seed's first face's draw, shared: the first face matches under either mode
    torch.testing.assert_close(fixed[0], drawn[0], rtol=0, atol=1e-5)
    zero = mmfs.stylize(same, seed=4, noise="zero")
    assert not torch.allclose(fixed, zero)
    x, w = torch.stack([lanczos_tensor(f) for f in same]), mmfs.style_from_seed(4)
    maps = mmfs.random_noise(1, torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(x, w_plus=w.expand(3, -1, -1), noise=[m.expand(3, -1, -1, -1) for m in maps])
    torch.testing.assert_close(fixed, want.clamp(-1, 1), rtol=0, atol=1e-4)
    shared = make_noises("fixed", 3, [4, 8], "cpu", torch.float32, torch.Generator().manual_seed(0))
    assert all(n.shape[0] == 3 and torch.equal(n[0], n[2]) for n in shared)
    with pytest.raises(ValueError, match="noise must be one of"):
        mmfs.stylize(same, noise="sometimes")
