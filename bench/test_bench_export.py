"""The exported stylize graph (mmfs-fast export --format onnx) in onnxruntime's
CPUExecutionProvider against the Engine on the CPU, in the same run: faces + w+ → images,
float32, the same thread count for both (bench/harness.py's).

Cases: the reduced profile (64², ngf 8) at batch 1 and 4, and the official 512² model at batch 1.
"""
from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import pytest
import torch

from mmfs_fast import benchmark as mb
from mmfs_fast.engine import Engine
from mmfs_fast.models import Stylizer, StylizerConfig

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROFILES = {"reduced-64": mb.REDUCED.stylizer, "full-512": StylizerConfig()}
CASES = [("reduced-64", 1), ("reduced-64", 4), ("full-512", 1)]
RUNTIMES = ("mmfs-fast-engine", "onnxruntime-cpu")
_FILES = tempfile.TemporaryDirectory(prefix="mmfs_fast-bench-export-")


@functools.cache
def stylizer(profile: str) -> Stylizer:
    torch.manual_seed(0)
    return Stylizer(dataclasses.replace(PROFILES[profile], clip_mapper=False)).eval().requires_grad_(False)


@functools.cache
def runner(runtime: str, profile: str):
    """A function of (faces, w_plus) for the runtime; the ONNX file has a dynamic batch axis."""
    if runtime == "mmfs-fast-engine":
        engine = Engine(stylizer(profile), device="cpu")
        return engine.stylize
    from mmfs_fast.export import export

    path = export(stylizer(profile), Path(_FILES.name) / f"{profile}.onnx", "onnx", "stylize",
                  dynamic_batch=True)["stylize"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda faces, w_plus: session.run(None, {"faces": faces.numpy(), "w_plus": w_plus.numpy()})[0]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("profile,batch", CASES)
def test_stylize_cpu(runtime: str, profile: str, batch: int, measure, benchmark):
    config = PROFILES[profile]
    g = torch.Generator().manual_seed(0)
    faces = torch.rand(batch, 3, config.size, config.size, generator=g) * 2 - 1
    w_plus = torch.randn(batch, 10, config.style_dim, generator=g)
    run = runner(runtime, profile)
    seconds = measure(lambda: run(faces, w_plus), group=f"export stylize {profile} b{batch} cpu", rounds=3,
                      config=runtime, scenario="guided_stylization", batch=batch, size=config.size,
                      precision="fp32", threads=torch.get_num_threads(), onnxruntime=ort.__version__)
    benchmark.extra_info["images_per_s"] = batch / seconds
