"""The mmfs-fast command end to end, in subprocesses, on generated images."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmfs_fast import MMFS, Stylizer, cli

SIZE = 64


def mmfs_fast(*args, env=None):
    """Run the console script (python -m mmfs_fast.cli where it is not on PATH)."""
    script = shutil.which("mmfs-fast")
    command = [script] if script else [sys.executable, "-m", "mmfs_fast.cli"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)


def run_main(*args) -> int:
    """The CLI in-process (a subprocess costs a torch import): what the console script runs."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors
        return e.code


def photo(seed, w=80, h=96):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Stylizer(size=SIZE, ngf=4, style_dim=32)


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    tiny_model.save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of good images in awkward formats, plus files that must fail."""
    root = tmp_path_factory.mktemp("inputs")
    good = root / "good"
    (good / "nested").mkdir(parents=True)
    photo(0).save(good / "rgb.png")
    photo(1).save(good / "nested" / "photo.jpg")
    photo(2).convert("CMYK").save(good / "cmyk.jpg")
    rgba = photo(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "rgba.png")
    photo(4).convert("L").save(good / "gray.png")
    Image.fromarray((np.asarray(photo(5).convert("L")).astype(np.uint16) * 257)).save(good / "sixteen.png")
    photo(6).convert("P").save(good / "palette.gif")
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (bad / "text.png").write_text("this is not an image\n")
    photo(7).save(bad / "whole.png")
    (bad / "truncated.png").write_bytes((bad / "whole.png").read_bytes()[:400])
    (bad / "whole.png").unlink()
    Image.new("RGB", (1200, 1000)).save(bad / "huge.png")  # over the 1,000,000-pixel limit set below
    return root


GOOD = ["rgb", "nested/photo", "cmyk", "rgba", "gray", "sixteen", "palette"]
BAD = ["corrupt.png", "text.png", "truncated.png", "huge.png", "missing.png"]


def test_stylize_reports_bad_inputs_and_writes_the_rest(ckpt, inputs, tmp_path):
    out = tmp_path / "out"
    r = mmfs_fast("stylize", inputs / "good", inputs / "bad" / "*.png", inputs / "bad" / "missing.png",
                  "--out", out, "--ckpt", ckpt, "--seed", 3, "--batch-size", 3, "--device", "cpu",
                  "--max-pixels", 1_000_000)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD), r.stderr
    for name in BAD:
        assert any(name in line for line in errors), (name, r.stderr)
    assert any("huge.png" in line and "exceeds the limit" in line for line in errors)
    assert any("missing.png" in line and "no such file" in line for line in errors)
    written = sorted(str(p.relative_to(out).with_suffix("")) for p in out.rglob("*.png"))
    assert written == sorted(GOOD)
    assert "Traceback" not in r.stderr
    # the CLI writes what the API computes for the same seed
    mmfs = MMFS.load(ckpt, device="cpu")
    files = [inputs / "good" / "cmyk.jpg", inputs / "good" / "gray.png", inputs / "good" / "nested" / "photo.jpg"]
    want = mmfs.stylize(files, seed=3, output="pil")
    for file, image in zip(["cmyk", "gray", "nested/photo"], want):
        got = np.asarray(Image.open(out / f"{file}.png"), dtype=np.int16)
        assert got.shape == (SIZE, SIZE, 3)
        # the CLI batches differently (batch conv rounding), so allow one grey level
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1


def test_stylize_all_good_exits_zero_and_env_pixel_limit(ckpt, inputs, tmp_path):
    r = mmfs_fast("stylize", inputs / "good" / "rgb.png", "--out", tmp_path, "--ckpt", ckpt, "--noise", "zero")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rgb.png").is_file() and "random seed" in r.stderr
    env = dict(os.environ, MMFS_FAST_MAX_PIXELS="100")
    r = mmfs_fast("stylize", inputs / "good" / "rgb.png", "--out", tmp_path, "--ckpt", ckpt, env=env)
    assert r.returncode == 1 and "exceeds the limit of 100" in r.stderr


@pytest.mark.parametrize("args, message", [
    ([], "--random-init"),
    (["--ckpt", "nonexistent.pt"], "no such checkpoint"),
    (["--ckpt", "{text}"], "not a readable PyTorch checkpoint"),
    (["--ckpt", "{ckpt}", "--text", "a", "--ref", "b"], "not allowed with"),
    (["--ckpt", "{ckpt}", "--text", "a sketch"], "--clip-weights"),
    (["--ckpt", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["--ckpt", "{ckpt}", "--paste-back"], "needs --align"),
])
def test_stylize_usage_errors_exit_2(ckpt, inputs, tmp_path, capsys, args, message):
    args = [a.format(ckpt=ckpt, text=inputs / "bad" / "text.png") for a in args]
    assert run_main("stylize", inputs / "good" / "rgb.png", "--out", tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_info_prints_the_build_as_json():
    r = mmfs_fast("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == __import__("mmfs_fast").__version__ and info["torch"] == torch.__version__
    assert isinstance(info["cuda_built"], bool) and isinstance(info["cuda_available"], bool)
    assert isinstance(info["torch_cuda_arch_list"], list)
    if info["cuda_built"]:
        assert info["cuda_arch_list"] and {"arch_list", "nvcc_flags"} <= set(info["build_info"])
    else:
        assert info["cuda_arch_list"] is None and info["build_info"] is None
    assert info["triton"] is None or isinstance(info["triton"], str)
    assert set(info["backends"]) == {"upfirdn2d", "bias_act", "styled_epilogue", "add_layer_norm", "linear_silu", "stem_conv"}
    for impls in info["backends"].values():
        assert "ref" in impls and set(impls) <= {"ref", "cuda", "triton"}
    assert ("cuda" in info["backends"]["upfirdn2d"]) == info["cuda_built"]


def test_convert_round_trip(tiny_model, tmp_path, capsys):
    official = {k: v.clone() for k, v in tiny_model.official_state_dict().items()}
    torch.save({"G_ema_model": official, "D_model": {}}, tmp_path / "official.pth")
    r = mmfs_fast("convert", tmp_path / "official.pth", tmp_path / "model.safetensors")
    assert r.returncode == 0, r.stderr
    converted = Stylizer.from_checkpoint(tmp_path / "model.safetensors")
    assert converted.config.ngf == 4 and converted.config.style_dim == 32 and converted.clip_mapper is not None
    r = mmfs_fast("convert", tmp_path / "model.safetensors", tmp_path / "back.pt", "--to", "official")
    assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)["G_ema_model"]
    assert back.keys() == official.keys()
    for key, value in official.items():
        assert torch.equal(back[key], value), key
    assert run_main("convert", tmp_path / "nope.pt", tmp_path / "x.safetensors") == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_demo_runs_without_weights(tmp_path):
    r = mmfs_fast("demo", "--out", tmp_path, "--size", 32, "--faces", 2, "--seeds", 0, 1)
    assert r.returncode == 0, r.stderr
    assert "RANDOM-INITIALISED" in r.stderr and str(tmp_path / "grid.png") in r.stdout
    for folder in ("inputs", "seed0", "seed1"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["face0.png", "face1.png"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 32, 2 * 32)  # columns: input + 2 seeds; rows: faces
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "seed0" / "face0.png")),
                              np.asarray(Image.open(tmp_path / "seed1" / "face0.png")))


def test_optional_subcommands_register_or_explain(tmp_path, monkeypatch, capsys):
    (tmp_path / "optional_ok.py").write_text(
        "def add_cli_parser(sub):\n"
        "    p = sub.add_parser('hello')\n"
        "    p.add_argument('--code', type=int, default=0)\n"
        "    p.set_defaults(func=lambda args: args.code)\n")
    (tmp_path / "optional_broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMANDS", {"hello": ("optional_ok", "says hello", "x"),
                                                      "broken": ("optional_broken", "needs more", "extra"),
                                                      "absent": ("optional_absent", "not installed", "x")})
    assert run_main("hello", "--code", 3) == 3
    assert run_main("broken", "--anything") == 2
    assert "a_dependency_that_is_not_installed" in capsys.readouterr().err
    assert run_main("absent") == 2  # argparse: no such command
    assert run_main("--help") == 0
    listing = capsys.readouterr().out
    assert "says hello" in listing and "needs more" in listing and "absent" not in listing
