"""Bad input is a clear error naming the file, never a traceback; every write is atomic; a
crafted checkpoint cannot make the loader allocate a huge model (issue #24).

The corpus and the mutations come from tests/bad_inputs.py."""
import builtins
import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bad_inputs
from mmfs_fast import MMFS, atomic, io
from mmfs_fast.cli import main
from mmfs_fast.errors import CheckpointError, EncoderWeightsError, ImageError, MMFSError, WriteError, option, render
from mmfs_fast.models import Stylizer, StylizerConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = StylizerConfig(size=32, ngf=4, style_dim=16, n_mlp=1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    Stylizer(SMALL).save(path)
    return path


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    return bad_inputs.write_image_corpus(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def ckpt_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    marker = folder / "PWNED"
    return bad_inputs.write_checkpoint_corpus(folder / "files", marker), marker


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# -- the error model ----------------------------------------------------------------------
def test_one_error_two_renderings():
    e = CheckpointError(f"x.pt: int8 weights; pass {option('allow_cast')} to cast them")
    assert str(e) == "x.pt: int8 weights; pass allow_cast=True to cast them"
    assert e.cli_message() == "x.pt: int8 weights; pass --allow-cast to cast them"
    assert isinstance(e, ValueError) and isinstance(e, MMFSError) and e.exit_code == 2
    assert render("{not} a placeholder", cli=True) == "{not} a placeholder"  # braces in data survive
    with pytest.raises(KeyError):
        option("no_such_option")


# -- images --------------------------------------------------------------------------------
def test_short_ihdr_is_an_image_error_naming_the_file(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(bad_inputs.short_ihdr_png())
    assert path.stat().st_size == 22
    with pytest.raises(ImageError, match="short.png"):
        io.load_image(path, 32)


def test_image_corpus_through_the_loader(image_corpus):
    for name, (path, readable) in image_corpus.items():
        if readable:
            x = io.load_image(path, 32)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and x.abs().max() <= 1, name
        else:
            with pytest.raises(ImageError) as info:
                io.load_image(path, 32)
            assert str(path) in str(info.value), name


def test_image_loader_fuzz(tmp_path):
    """Seeded mutations of valid PNG, JPEG, GIF and TIFF files: each loads as a finite image or
    is an ImageError naming its file; nothing else escapes."""
    rng = random.Random(24)
    rgb = bad_inputs.sample_rgb(16)
    seeds = {".png": bad_inputs.encoded(rgb, "PNG"), ".jpg": bad_inputs.encoded(rgb, "JPEG"),
             ".gif": bad_inputs.encoded(rgb.convert("P"), "GIF"), ".tif": bad_inputs.encoded(rgb, "TIFF"),
             ".bmp": bad_inputs.encoded(rgb, "BMP")}

    def loaded(path):
        x = io.load_image(path, 16, max_pixels=1_000_000)
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()

    counts = bad_inputs.fuzz(tmp_path / "m", seeds, 3000, rng, loaded, ImageError)
    assert counts["ok"] > 100 and counts["error"] > 100  # the mutations reach both outcomes


@pytest.fixture(scope="module")
def mmfs_small():
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        return MMFS.load(random_init=True, config=SMALL, device="cpu", engine=False)


def test_stylize_iter_names_the_bad_file_and_writes_the_rest(image_corpus, mmfs_small):
    paths = [path for path, _ in image_corpus.values()]
    results = dict(mmfs_small.stylize_iter(paths, seed=1, skip_errors=True, batch_size=4))
    assert sorted(results) == list(range(len(paths)))
    for i, (name, (path, readable)) in enumerate(image_corpus.items()):
        if readable:
            assert isinstance(results[i], torch.Tensor), name
        else:
            assert isinstance(results[i], ImageError) and str(path) in str(results[i]), name


def test_cli_mixed_folder_writes_every_good_file(image_corpus, tiny_ckpt, tmp_path, capsys):
    folder = next(iter(image_corpus.values()))[0].parent
    code, err = run_cli(["stylize", folder, "--ckpt", tiny_ckpt, "--out", tmp_path / "out", "--seed", "3",
                         "--device", "cpu"], capsys)
    assert code == 1
    written = sorted(p.stem for p in (tmp_path / "out").iterdir())
    assert written == sorted(name for name, (_, readable) in image_corpus.items() if readable)
    for name, (path, readable) in image_corpus.items():
        assert (str(path) in err) != readable, name
    for png in (tmp_path / "out").iterdir():
        Image.open(png).load()


def test_align_honours_max_pixels(tmp_path):
    from mmfs_fast import faces

    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 40)).save(path)

    class NoFaces:
        def __call__(self, image):
            return []

    results = dict(faces.stylize_photo_files([(path, "photo")], lambda b: b, tmp_path / "out", size=32,
                                             detector=NoFaces(), max_pixels=1000))
    assert isinstance(results[path], ImageError) and "1600 pixels exceeds the limit of 1000" in str(results[path])
    assert isinstance(dict(faces.stylize_photo_files([(path, "photo")], lambda b: b, tmp_path / "out", size=32,
                                                     detector=NoFaces(), max_pixels=2000))[path], faces.PhotoResult)


def test_align_with_no_face_in_any_photo_exits_1(tmp_path, monkeypatch, capsys):
    from mmfs_fast import faces

    monkeypatch.setattr(faces, "FaceDetector", lambda **kw: (lambda image: []))
    Image.new("RGB", (40, 40), (128, 128, 128)).save(tmp_path / "blank.png")
    code, err = run_cli(["stylize", tmp_path / "blank.png", "--random-init", "--align", "--out", tmp_path / "out",
                         "--device", "cpu", "--seed", "0"], capsys)
    assert code == 1 and "no face found" in err


# -- checkpoints ---------------------------------------------------------------------------
def test_checkpoint_corpus_is_refused_naming_the_file(ckpt_corpus):
    corpus, marker = ckpt_corpus
    for name, path in corpus.items():
        with pytest.raises(CheckpointError) as info:
            Stylizer.from_checkpoint(path)
        assert str(path) in str(info.value), name
        assert "weights_only" not in str(info.value), name  # torch's advice does not apply here
    assert not marker.exists()  # no pickle ran its payload


def test_checkpoint_corpus_through_the_cli(ckpt_corpus, tmp_path, capsys):
    corpus, marker = ckpt_corpus
    for name, path in corpus.items():
        code, err = run_cli(["convert", path, tmp_path / "out.safetensors"], capsys)
        assert code == 2 and str(path) in err, name
        assert len(err.strip().splitlines()) <= 6, (name, err)  # one message (a list of keys at most)
    assert not (tmp_path / "out.safetensors").exists() and not marker.exists()


def test_specific_checkpoint_messages(ckpt_corpus):
    corpus, _ = ckpt_corpus
    expect = {"g_ema_tensor": "G_ema_model is a Tensor", "g_ema_list": "G_ema_model is a list",
              "non_tensor_value": "is a float, not a tensor", "evil_config_key": "unknown entries ['evil']",
              "int8": "allow_cast=True", "bool": "torch.bool", "nan": "NaN or Inf", "inf": "NaN or Inf",
              "huge_config": "ngf must be an int in [1, 128], got 2048", "malicious_torch": "Python objects",
              "config_deep": "not valid JSON"}
    for name, fragment in expect.items():
        with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            Stylizer.from_checkpoint(corpus[name])


def test_integer_weights_load_only_when_cast_is_allowed(tmp_path, capsys):
    torch.manual_seed(0)
    model = Stylizer(SMALL)
    state = {k: (v * 100).round().to(torch.int16) for k, v in model.official_state_dict().items()}
    path = tmp_path / "int16.pt"
    torch.save({"G_ema_model": state}, path)
    with pytest.raises(CheckpointError, match="allow_cast=True"):
        Stylizer.from_checkpoint(path)
    loaded = Stylizer.from_checkpoint(path, allow_cast=True)
    torch.testing.assert_close(loaded.state_dict()["decoder0.conv.weight"], state["decoder0.conv.weight"].float())
    code, err = run_cli(["convert", path, tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "--allow-cast" in err and "allow_cast=True" not in err
    code, _ = run_cli(["convert", path, tmp_path / "x.safetensors", "--allow-cast"], capsys)
    assert code == 0 and (tmp_path / "x.safetensors").is_file()


def test_official_checkpoint_of_a_64px_model_loads_as_64px(tmp_path):
    from mmfs_fast.models import Discriminator

    torch.manual_seed(0)
    model = Stylizer(size=64, ngf=4, style_dim=16, n_mlp=1)
    path = tmp_path / "official64.pt"
    torch.save({"G_ema_model": model.official_state_dict(),
                "D_model": Discriminator(size=64, base=4).state_dict()}, path)
    assert Stylizer.from_checkpoint(path).config.size == 64
    torch.save({"G_ema_model": model.official_state_dict()}, path)  # no discriminator: the official size
    assert Stylizer.from_checkpoint(path).config.size == 512


def test_huge_config_is_refused_without_allocating(tmp_path):
    """A 180-byte file whose config asks for ngf 2048, and one within the bounds but far larger
    than its tensors: both refused with the peak RSS within 100 MB of what it was before."""
    from safetensors.torch import save

    files = {"huge": {"ngf": 2048}, "large": {"ngf": 128, "size": 1024}}
    for name, config in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(
            save({"x": torch.zeros(2)}, metadata={"format": "mmfs_fast", "config": json.dumps(config)}))
    assert (tmp_path / "huge.safetensors").stat().st_size < 200
    script = textwrap.dedent(f"""
        import resource, sys
        from mmfs_fast.models import CheckpointError, Stylizer
        Stylizer.from_checkpoint  # imports done
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name in {sorted(files)!r}:
            try:
                Stylizer.from_checkpoint({str(tmp_path)!r} + "/" + name + ".safetensors")
            except CheckpointError as e:
                print("REFUSED:", name)
        print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("REFUSED:") == 2, out.stdout
    peak_kb = int(out.stdout.split("peak_kb")[1])
    assert peak_kb < 100 * 1024, out.stdout


# -- checkpoint fuzz -------------------------------------------------------------------------
def test_checkpoint_loader_fuzz(tmp_path):
    """Seeded mutations of a valid .pt and a valid .safetensors file: each loads as a finite
    model or is a CheckpointError naming its file."""
    state = bad_inputs.tiny_state()
    seeds = {".pt": bad_inputs.torch_bytes({"G_ema_model": state}),
             ".safetensors": bad_inputs.safetensors_bytes(state, {"format": "mmfs_fast",
                                                                  "config": json.dumps(bad_inputs.TINY)})}
    rng = random.Random(7)

    def loaded(path):
        model = Stylizer.from_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())

    outcomes = bad_inputs.fuzz(tmp_path / "c", seeds, 600, rng, loaded, CheckpointError)
    assert outcomes["error"] > 100 and outcomes["ok"] > 10


# -- fine-tuning resume ----------------------------------------------------------------------
def test_corrupt_finetune_resume_file_is_named(tmp_path):
    from test_finetune import StandInCLIP, StandInDINO

    from mmfs_fast.finetune import STATE_FILE, finetune

    torch.manual_seed(0)
    stylizer = Stylizer(size=64, ngf=4, style_dim=32)
    faces = torch.rand(2, 3, 64, 64) * 2 - 1
    state = tmp_path / STATE_FILE
    for content in (b"garbage", bad_inputs.torch_bytes({"step": 1}), b""):
        state.write_bytes(content)
        with pytest.raises(CheckpointError, match=str(state)):
            finetune(stylizer, StandInCLIP(), StandInDINO(), faces, text="pop art", steps=1, decay_steps=0,
                     batch_size=2, checkpoint_dir=tmp_path, progress=False)


# -- atomic writes -------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.bin"
    atomic.write_bytes(path, b"old")

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".latest.{dead}.tmp.pt"
    alive = tmp_path / f".latest.{os.getppid()}.tmp.pt"
    unrelated = tmp_path / ".latest.pt.notes"
    for p in (stale, alive, unrelated):
        p.write_bytes(b"x")
    assert atomic.remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and unrelated.exists()


def test_resumed_losses_csv_is_rewritten_atomically(tmp_path, monkeypatch):
    from mmfs_fast.train.monitor import LOSSES_CSV, Monitor

    (tmp_path / LOSSES_CSV).write_text("step,total\n1,0.5\n2,0.4\n3,0.3\n4,0.")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(Path(b).name), real_replace(a, b)))
    Monitor(tmp_path, start_step=2, total_steps=5).close()
    assert replaced == [LOSSES_CSV]
    assert (tmp_path / LOSSES_CSV).read_text().splitlines() == ["step,total", "1,0.5", "2,0.4"]


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only: by its mode, and for root (whom modes do not stop) by refusing to
    open, create or rename anything in it for writing."""
    folder.chmod(0o555)
    real_open, real_os_open, real_replace, real_mkdir = builtins.open, os.open, os.replace, os.mkdir
    inside = lambda p: Path(os.fspath(p)).resolve().is_relative_to(folder.resolve())  # noqa: E731

    def refuse(p):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(file):
            refuse(file)
        return real_os_open(file, flags, *args, **kwargs)

    try:
        if os.geteuid() == 0:
            builtins.open, os.open = guarded_open, guarded_os_open
            os.replace = lambda a, b, **kw: refuse(b) if inside(b) else real_replace(a, b, **kw)
            os.mkdir = lambda p, *a, **kw: refuse(p) if inside(p) else real_mkdir(p, *a, **kw)
        yield folder
    finally:
        builtins.open, os.open, os.replace, os.mkdir = real_open, real_os_open, real_replace, real_mkdir
        folder.chmod(0o755)


def test_read_only_output_folder_is_a_clear_error(tmp_path, tiny_ckpt, capsys):
    Image.new("RGB", (32, 32), (90, 120, 150)).save(tmp_path / "face.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = {
        "stylize": ["stylize", tmp_path / "face.png", "--ckpt", tiny_ckpt, "--out", ro / "out", "--seed", "1"],
        "stylize_in_place": ["stylize", tmp_path / "face.png", "--ckpt", tiny_ckpt, "--out", ro, "--seed", "1"],
        "convert": ["convert", tiny_ckpt, ro / "x.safetensors"],
        "convert_official": ["convert", tiny_ckpt, ro / "x.pt", "--to", "official"],
        "demo": ["demo", "--size", "32", "--faces", "1", "--seeds", "0", "--out", ro / "demo"],
    }
    for name, args in commands.items():
        with read_only(ro):
            code, err = run_cli(args + ["--device", "cpu"] if name.startswith(("stylize", "demo")) else args, capsys)
        assert code == 2, (name, err)
        assert "cannot write it (permission denied)" in err and str(ro) in err, (name, err)
        assert list(ro.rglob("*")) == [], name  # nothing, not even a temporary file


TRAIN = ["train", "--stage", "1", "--random-init", "--size", "128", "--ngf", "4", "--style-dim", "32", "--n-mlp", "2",
         "--d-base", "8", "--batch-size", "2", "--impl", "ref", "--workers", "0", "--steps", "1", "--device", "cpu"]


def one_face_detector(monkeypatch):
    """Every photo has one face filling its centre (the detector itself is tested in test_faces)."""
    from mmfs_fast import faces

    def detect(image):
        h, w = image.shape[:2]
        quad = np.array([[w * 0.2, h * 0.2], [w * 0.2, h * 0.8], [w * 0.8, h * 0.8], [w * 0.8, h * 0.2]])
        return [faces.Face((0, 0, w, h), 1.0, np.zeros((68, 2)), quad)]

    monkeypatch.setattr(faces, "FaceDetector", lambda **kw: detect)


def test_read_only_output_folder_for_align_and_train(tmp_path, tiny_ckpt, monkeypatch, capsys):
    one_face_detector(monkeypatch)
    Image.new("RGB", (48, 48), (90, 120, 150)).save(tmp_path / "photo.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    align = ["stylize", tmp_path / "photo.png", "--ckpt", tiny_ckpt, "--align", "--paste-back", "--seed", "1",
             "--device", "cpu"]
    code, err = run_cli(align + ["--out", tmp_path / "ok"], capsys)  # the fake detector does find a face
    assert code == 0 and sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["photo.png", "photo_face0.png"]
    for args in (align + ["--out", ro], TRAIN + ["--out-dir", ro / "run"]):
        with read_only(ro):
            code, err = run_cli(args, capsys)
        assert code == 2 and "cannot write it (permission denied)" in err, (args[0], err)
        assert list(ro.rglob("*")) == [], args[0]


def test_train_on_a_full_disk_is_a_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-c", FULL_DISK, "4096", *TRAIN, "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "file size limit is exceeded" in run.stderr
    assert not (tmp_path / "run" / "latest.pt").exists()
    assert [f for f in (tmp_path / "run").rglob(".*")] == []  # no temporary file left


FULL_DISK = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
    from mmfs_fast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_full_disk_leaves_no_partial_file(tmp_path, tiny_ckpt):
    """RLIMIT_FSIZE makes every write past 256 bytes fail like a full disk would: a clear error,
    exit 2 and no truncated file (the stylized PNGs and the checkpoints are larger)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "face.png")
    out = tmp_path / "out"
    commands = {
        "stylize": ["stylize", tmp_path / "face.png", "--ckpt", tiny_ckpt, "--out", out / "s", "--seed", "1",
                    "--device", "cpu"],
        "convert": ["convert", tiny_ckpt, out / "c" / "x.safetensors"],
        "demo": ["demo", "--size", "32", "--faces", "1", "--seeds", "0", "--out", out / "d", "--device", "cpu"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    for name, args in commands.items():
        run = subprocess.run([sys.executable, "-c", FULL_DISK, "256", *map(str, args)], capture_output=True,
                             text=True, timeout=600, env=env)
        assert run.returncode == 2, (name, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "file size limit is exceeded" in run.stderr, name
        for f in out.rglob("*"):
            assert not f.name.startswith("."), f  # no temporary file left
            if f.is_file():
                Image.open(f).load()  # whatever was written is whole (demo's small input faces)


# -- API -----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", [False, True], ids=["plain", "engine"])
def test_api_rejects_non_finite_and_out_of_range_faces(engine):
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        mmfs = MMFS.load(random_init=True, config=SMALL, device="cpu", engine=engine)
    good = torch.rand(3, 32, 32) * 2 - 1
    for bad in (torch.full((3, 32, 32), float("nan")), good.clone().fill_(float("inf")), (good + 1) * 127.5):
        with pytest.raises(ValueError, match="finite images in"):
            mmfs.stylize([good, bad], seed=0)
    assert mmfs.stylize([good * 1.2], seed=0).isfinite().all()  # a little overshoot is fine


def test_one_seed_rule_everywhere(mmfs_small, capsys):
    from mmfs_fast.engine import Engine

    engine = Engine(Stylizer(SMALL), device="cpu")
    face = torch.zeros(3, 32, 32)
    for seed in (-1, 2 ** 63, 2 ** 70):
        for call in (lambda: mmfs_small.stylize([face], seed=seed), lambda: mmfs_small.style_from_seed(seed),
                     lambda: engine.style_from_seed(seed)):
            with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
                call()
    assert mmfs_small.style_from_seed(2 ** 63 - 1).shape == (1, 10, 16)
    assert engine.style_from_seed(2 ** 63 - 1).shape == (1, 10, 16)
    code, err = run_cli(["stylize", "x.png", "--random-init", "--out", "o", "--seed", str(2 ** 70)], capsys)
    assert code == 2 and "--seed: seed must be in [0, 2**63)" in err
    code, err = run_cli(["demo", "--size", "32", "--seeds", "0", "-1", "--out", "o"], capsys)
    assert code == 2 and "--seeds: seed must be in [0, 2**63)" in err


# -- encoders and messages -------------------------------------------------------------------
def test_torchscript_clip_is_refused_unless_trusted(tmp_path, capsys):
    from mmfs_fast.encoders import CLIPEncoder

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(EncoderWeightsError, match="trust_torchscript=True"):
        CLIPEncoder(path)
    with pytest.raises(EncoderWeightsError, match="not usable as") as info:  # past the gate: the keys differ
        CLIPEncoder(path, trust_torchscript=True)
    assert "TorchScript" not in str(info.value)
    code, err = run_cli(["stylize", "x.png", "--random-init", "--clip-weights", path, "--text", "a", "--out",
                         tmp_path / "o", "--device", "cpu"], capsys)
    assert code == 2 and "--trust-torchscript" in err


def test_garbage_clip_weights_are_one_line(tmp_path, capsys):
    path = tmp_path / "garbage.pt"
    path.write_bytes(random.Random(0).randbytes(2000))
    code, err = run_cli(["stylize", "x.png", "--random-init", "--clip-weights", path, "--text", "a", "--out",
                         tmp_path / "o", "--device", "cpu"], capsys)
    message = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(message) == 1 and str(path) in message[0]
    assert "weights_only" not in err


def test_finetune_without_clip_weights_names_the_flags(tmp_path, tiny_ckpt, capsys):
    code, err = run_cli(["finetune", "--ckpt", tiny_ckpt, "--faces", tmp_path, "--text", "pop art", "--out",
                         tmp_path / "out.safetensors", "--device", "cpu"], capsys)
    assert code == 2 and "--clip-weights" in err and "--random-init" in err
    assert "random_init=True" not in err and "weights=" not in err


def test_explicit_backends_say_the_actual_cause(capsys):
    from mmfs_fast.ops import _backend

    code, err = run_cli(["stylize", "x.png", "--random-init", "--out", "o", "--impl", "cuda", "--device", "cpu"],
                        capsys)
    assert code == 2 and "--impl cuda" in err
    if _backend.installed("cuda"):
        assert ("no CUDA GPU" in err) == (not torch.cuda.is_available())
        assert "not built" not in err
    if _backend.installed("triton") and not _backend.triton_interpreting():
        code, err = run_cli(["stylize", "x.png", "--random-init", "--out", "o", "--impl", "triton", "--device",
                             "cpu"], capsys)
        assert code == 2 and "Triton is installed" in err and "pip install triton" not in err


def test_info_says_which_backend_each_op_uses(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["op_backends"]
    assert set(plan) == {"upfirdn2d", "bias_act", "styled_epilogue", "add_layer_norm", "linear_silu", "stem_conv"}
    for op, entry in plan.items():
        assert entry["auto_uses"] in ("ref", "cuda", "triton") and entry["why"]
        if not torch.cuda.is_available():
            assert entry["auto_uses"] == "ref" and "cuda" in entry["cannot_run"]
    assert report["next_step"]


def test_random_init_banner_names_dino():
    from mmfs_fast.commands.common import RANDOM_INIT_BANNER

    assert "DINO" in RANDOM_INIT_BANNER and "--dino-weights" in RANDOM_INIT_BANNER


def test_write_error_names_the_file_and_the_reason(tmp_path):
    target = tmp_path / "not_a_folder"
    target.write_text("x")
    with pytest.raises(WriteError, match="not_a_folder"):
        io.save_image(torch.zeros(3, 4, 4), target / "a.png")
    assert isinstance(WriteError("x"), OSError)  # callers catching OSError still catch it
