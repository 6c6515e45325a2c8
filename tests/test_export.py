"""Export: each graph run by onnxruntime, and as an AOTInductor package from Python and from C++,
equals the Engine's float32 output; the files carry their metadata; float16 keeps the styles
in float32; bad options fail with exit code 2 and leave no file behind."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfs_fast import benchmark as mb
from mmfs_fast import cli
from mmfs_fast.engine import Engine
from mmfs_fast.export import ExportError, export, read_metadata
from mmfs_fast.errors import WriteError
from mmfs_fast.models import Stylizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parent.parent
# Engine (oneDNN) against onnxruntime (MLAS) or Inductor: the same float32 math in other
# kernels and summation orders; the differences seen are ~1e-6
ATOL = RTOL = 1e-4
PROMPTS = ("a pop art portrait", "an oil painting", "a pencil sketch")
ONNX_GRAPHS = ("stylize", "stylize-noise", "style-image", "style-text", "random-style")


def run_main(*args) -> int:
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors
        return e.code


@pytest.fixture(scope="module")
def models():
    """The reduced bench profile (64², ngf 8, style_dim 512, a narrow CLIP with ViT-B/32's
    inputs), with random biases and noise strengths: freshly initialised ones are zero."""
    stylizer, clip = mb.build_models(mb.REDUCED, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in stylizer.named_parameters():
            if name.endswith("bias") or name.endswith("noise.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return stylizer, clip, Engine(stylizer, clip=clip, device="cpu", style_cache_size=0)


def case(graph: str, batch: int, models) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the exported graph's inputs, what the Engine returns for the same request)."""
    stylizer, clip, engine = models
    g = torch.Generator().manual_seed(batch)
    size, dim = stylizer.config.size, stylizer.config.style_dim
    if graph.startswith("stylize"):
        faces = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        w_plus = torch.randn(batch, 10, dim, generator=g)
        inputs = {"faces": faces, "w_plus": w_plus}
        if graph == "stylize-noise":
            noises = [torch.randn(batch, 1, r, r, generator=g) for r in stylizer.noise_resolutions]
            inputs.update({f"noise{i}": n for i, n in enumerate(noises)})
            return inputs, engine.stylize(faces, w_plus, noise=noises)
        return inputs, engine.stylize(faces, w_plus)
    if graph == "random-style":
        z = torch.randn(batch, dim, generator=g)
        return {"z": z}, engine.style_from_z(z)
    if graph == "style-image":
        images = torch.rand(batch, 3, 96, 80, generator=g) * 2 - 1
        return {"pixels": clip.preprocess(images)}, engine.style_from_image(images)
    texts = list(PROMPTS[:batch])
    return {"tokens": clip.tokenizer(texts)}, engine.style_from_text(texts)


@pytest.fixture(scope="module")
def onnx_files(models, tmp_path_factory):
    """Every graph, one file each with a dynamic batch axis."""
    stylizer, clip, _ = models
    out = tmp_path_factory.mktemp("onnx")
    files = export(stylizer, out, "onnx", "all", clip=clip, dynamic_batch=True)
    files["stylize-noise"] = export(stylizer, out / "stylize-noise.onnx", "onnx", "stylize", dynamic_batch=True,
                                    noise_inputs=True)["stylize"]
    return files


def onnx_run(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {name: t.numpy() for name, t in inputs.items()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("graph", ONNX_GRAPHS)
def test_onnx_graph_equals_the_engine_at_batch_1_and_3(graph, onnx_files, models):
    path = onnx_files[graph]
    proto = onnx.load(str(path))
    # stock ONNX only: no custom domain, no local functions a runtime must know
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input)  # a symbolic batch
    for batch in (1, 3):
        inputs, expected = case(graph, batch, models)
        torch.testing.assert_close(onnx_run(path, inputs), expected, atol=ATOL, rtol=RTOL)


def test_onnx_metadata_describes_the_graph(onnx_files, models):
    stylizer, _, _ = models
    import mmfs_fast

    meta = read_metadata(onnx_files["stylize-noise"])
    session = ort.InferenceSession(str(onnx_files["stylize-noise"]), providers=["CPUExecutionProvider"])
    assert [i["name"] for i in meta["inputs"]] == [i.name for i in session.get_inputs()]
    assert [i["shape"] for i in meta["inputs"]] == [i.shape for i in session.get_inputs()]
    assert meta["inputs"][0]["range"] == [-1.0, 1.0] and meta["outputs"][0]["range"] == [-1.0, 1.0]
    assert len(meta["inputs"]) == 2 + len(stylizer.noise_resolutions)
    assert meta["graph"] == "stylize" and meta["format"] == "onnx" and meta["batch"] == "dynamic"
    assert meta["model_config"]["size"] == stylizer.config.size and meta["mmfs_fast_version"] == mmfs_fast.__version__
    assert meta["source_checkpoint"] is None  # a model built in memory
    text = read_metadata(onnx_files["style-text"])
    assert text["inputs"][0] | {"about": ""} == {"name": "tokens", "shape": ["batch", 77], "dtype": "int64",
                                                  "range": [0, 49407], "about": ""}


def test_float16_onnx_keeps_styles_and_demodulation_in_float32(models, tmp_path):
    """The convolutions run in float16, but for the FIR blurs after the transposed convolutions,
    which the decoder's epilogue runs in float32 arithmetic; the style affines (Gemm/MatMul) and
    the demodulation coefficients (rsqrt: Sqrt, Reciprocal) in float32, as the Engine computes
    them, and only the 1×1 convolutions run as matrix products (ToRGB with its per-sample weights,
    the ResBlock skips) in float16; the interface stays float32."""
    stylizer, _, engine = models
    path = export(stylizer, tmp_path / "fp16.onnx", "onnx", "stylize", dtype="float16", batch_size=2)["stylize"]
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    nodes = {}
    for node in proto.graph.node:
        nodes.setdefault((node.op_type, types[node.output[0]]), []).append(node)
    kinds = {op: {t for (o, t) in nodes if o == op} for op, _ in nodes}
    attributes = lambda node: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    upsamplings = len(nodes[("ConvTranspose", float16)])
    assert kinds["ConvTranspose"] == {float16} and upsamplings == 4
    fp32_convs = nodes[("Conv", float32)]
    assert len(fp32_convs) == upsamplings and all(attributes(n)["kernel_shape"] == [4, 4] and attributes(n)["group"] > 1
                                                 for n in fp32_convs)
    assert kinds["Sqrt"] == kinds["Reciprocal"] == {float32}
    # one ToRGB per resolution and the four ResBlock skips (1×1 convolutions as matrix products)
    assert len(nodes[("MatMul", float16)]) == 1 + upsamplings + 4
    assert {t for op in ("MatMul", "Gemm") for t in kinds.get(op, ())} == {float32, float16}
    assert {types[i.name] for i in [*proto.graph.input, *proto.graph.output]} == {float32}
    inputs, expected = case("stylize", 2, models)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime builds without float16 CPU kernels
        pytest.skip(f"this onnxruntime does not run float16 convolutions on the CPU: {e}")
    (out,) = session.run(None, {name: t.numpy() for name, t in inputs.items()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=3e-2, rtol=0)
    # styles far outside the usual range: the pre-normalised fp16 convolutions cannot overflow
    (loud,) = session.run(None, {"faces": inputs["faces"].numpy(), "w_plus": (inputs["w_plus"] * 1e3).numpy()})
    assert torch.from_numpy(loud).isfinite().all()


# -- AOTInductor ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aoti_packages(models, tmp_path_factory):
    """graph → its package (dynamic batch), compiled on first use."""
    stylizer, clip, _ = models
    out, packages = tmp_path_factory.mktemp("aoti"), {}

    def package(graph: str) -> Path:
        if graph not in packages:
            packages[graph] = export(stylizer, out / f"{graph}.pt2", "aoti", graph, clip=clip,
                                     dynamic_batch=True)[graph]
        return packages[graph]

    return package


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["stylize", "style-image", "style-text", "random-style"])
def test_aoti_package_equals_the_engine_at_batch_1_and_3(graph, aoti_packages, models):
    """Each package's compile (Inductor, then the C++ compiler) is the cost: 20-40 s on 2 cores."""
    path = aoti_packages(graph)
    compiled = torch._inductor.aoti_load_package(str(path))
    assert json.loads(compiled.get_metadata()["mmfs_fast"]) == read_metadata(path)
    assert read_metadata(path)["format"] == "aoti" and read_metadata(path)["graph"] == graph
    for batch in (1, 3):
        inputs, expected = case(graph, batch, models)
        torch.testing.assert_close(compiled(*inputs.values()), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="needs make and a C++ compiler")
def test_cpp_example_runs_the_package(aoti_packages, models, tmp_path):
    """examples/aoti_cpp built against the libtorch inside pip's torch (about 30 s of compile)."""
    build = subprocess.run(["make", "-C", str(REPO / "examples" / "aoti_cpp"), f"PYTHON={sys.executable}",
                            f"BUILD_DIR={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    binary, package = tmp_path / "mmfs_aoti", aoti_packages("stylize")
    inputs, expected = case("stylize", 3, models)
    torch.save(list(inputs.values()), tmp_path / "inputs.pt")
    run = subprocess.run([str(binary), str(package), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == read_metadata(package)
    (images,) = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=RTOL)
    usage = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr


# -- the command line and bad input --------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_without_clip_mapper(tmp_path_factory):
    """A phase 1/2 style checkpoint: no clip_mapper."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "phase2.safetensors"
    Stylizer(size=64, ngf=4, style_dim=32, clip_mapper=False).save(path)
    return path


def test_cli_exports_and_prints_the_metadata(ckpt_without_clip_mapper, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_main("export", "--ckpt", ckpt_without_clip_mapper, "--format", "onnx", "--out", out,
                    "--what", "stylize", "random-style", "--batch-size", "2")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [Path(r["file"]).name for r in report] == ["stylize.onnx", "random-style.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["random-style.onnx", "stylize.onnx"]  # no temporary left
    sha256 = hashlib.sha256(ckpt_without_clip_mapper.read_bytes()).hexdigest()
    for entry in report:
        assert entry["metadata"] == read_metadata(entry["file"])
        assert entry["metadata"]["source_checkpoint"] == {"file": "phase2.safetensors", "sha256": sha256}
        assert entry["metadata"]["batch"] == 2 and entry["bytes"] == Path(entry["file"]).stat().st_size
    session = ort.InferenceSession(report[0]["file"], providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[2, 3, 64, 64], [2, 10, 32]]


def test_unknown_format_is_a_usage_error(ckpt_without_clip_mapper, tmp_path, capsys):
    out = tmp_path / "model.tflite"
    assert run_main("export", "--ckpt", ckpt_without_clip_mapper, "--format", "tflite", "--out", out) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export(Stylizer(size=64, ngf=4, style_dim=32), out, "tflite")


@pytest.mark.parametrize("graph", ["style-text", "style-image", "all"])
def test_style_graphs_need_a_clip_mapper(graph, ckpt_without_clip_mapper, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_main("export", "--ckpt", ckpt_without_clip_mapper, "--format", "onnx", "--out", out, "--what", graph)
    err = capsys.readouterr().err
    assert code == 2 and str(ckpt_without_clip_mapper) in err and "no clip_mapper" in err
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    ((), "no weights: pass --ckpt"),
    (("--size", "128"), "the checkpoint is a 64² model, not --size 128"),
    (("--what", "stylize", "nonsense"), "invalid choice: 'nonsense'"),
    (("--batch-size", "0"), "batch_size must be a positive int"),
], ids=["no-weights", "size-mismatch", "unknown-graph", "batch-size"])
def test_bad_options_are_usage_errors(options, message, ckpt_without_clip_mapper, tmp_path, capsys):
    weights = ("--ckpt", ckpt_without_clip_mapper) if options else ()
    out = tmp_path / "out.onnx"
    assert run_main("export", *weights, "--format", "onnx", "--out", out, *options) == 2
    assert message in capsys.readouterr().err and not out.exists()


def read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: mode 0555, or for root (whom modes do not stop) sysfs."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        with open("/sys/.mmfs_fast_probe", "xb"):
            pass
    except OSError:
        return Path("/sys")
    os.unlink("/sys/.mmfs_fast_probe")
    pytest.skip("no read-only folder for root on this machine")


def test_read_only_output_is_a_usage_error(ckpt_without_clip_mapper, tmp_path, capsys):
    folder = read_only_folder(tmp_path)
    before = set(os.listdir(folder))
    out = folder / "stylize.onnx"
    assert run_main("export", "--ckpt", ckpt_without_clip_mapper, "--format", "onnx", "--out", out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "cannot write" in err and "Traceback" not in err
    assert set(os.listdir(folder)) == before


def test_a_failed_write_leaves_no_partial_file(ckpt_without_clip_mapper, tmp_path, monkeypatch):
    """The disk fills up after half the bytes: the error names the file, and neither it nor the
    temporary beside it remains."""
    stylizer = Stylizer.from_checkpoint(ckpt_without_clip_mapper)

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "random-style.onnx"
    with pytest.raises(WriteError, match=f"{out}: cannot write it .the disk is full"):
        export(stylizer, out, "onnx", "random-style")
    assert list(tmp_path.iterdir()) == []


def test_read_metadata_rejects_foreign_files(tmp_path):
    foreign = tmp_path / "other.onnx"
    foreign.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="other.onnx: not a file exported by mmfs_fast"):
        read_metadata(foreign)
