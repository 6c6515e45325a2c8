"""Packaging: the CUDA extension uses only LibTorch's stable ABI and Python's limited API (an
nm audit of the built library), and `pip wheel .` in an isolated build makes a cp310-abi3 wheel
that installs into a fresh venv, where `mmfs-fast info` finds the extension loaded and its ops
registered with CUDA kernels."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from mmfs_fast.ops import _backend, _cuda

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = _backend.cuda_extension()
built = pytest.mark.skipif(EXTENSION is None, reason="mmfs_fast._C is not built (no nvcc or CPU-only torch)")
# Mangled C++ names of libtorch's own (unstable) API, demangled: what a stable-ABI build never calls.
UNSTABLE_NAMESPACES = re.compile(r"\b(at|c10|torch|caffe2|pybind11)::")


def dynamic_symbols(library: Path, *flags: str) -> list[tuple[str, str]]:
    """(type letter, name) of the dynamic symbol table, names demangled."""
    out = subprocess.run(["nm", "-D", "-C", *flags, str(library)], capture_output=True, text=True, check=True).stdout
    rows = [line.split(maxsplit=2)[-2:] if len(line.split()) > 2 else line.split() for line in out.splitlines()]
    return [(row[0], row[1]) for row in rows if len(row) == 2]


def stable_abi_names() -> set[str]:
    """CPython's own list of its stable-ABI symbols (generated into its test suite from
    Misc/stable_abi.toml)."""
    listing = Path(sysconfig.get_path("stdlib")) / "test" / "test_stable_abi_ctypes.py"
    if not listing.is_file():
        pytest.skip(f"CPython's stable-ABI symbol list {listing} is not installed")
    tree = ast.parse(listing.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SYMBOL_NAMES" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"no SYMBOL_NAMES in {listing}")


@built
def test_extension_is_abi3_and_calls_no_unstable_libtorch_symbol():
    library = Path(EXTENSION.__file__)
    assert library.name == "_C.abi3.so", library.name
    undefined = [name for _, name in dynamic_symbols(library, "--undefined-only")]
    unstable = [name for name in undefined if UNSTABLE_NAMESPACES.search(name)]
    assert not unstable, f"{library.name} calls libtorch's unstable C++ API: {unstable[:10]}"
    # what it does call of libtorch: the stable C shim, nothing else
    assert any(name.startswith("aoti_torch_") for name in undefined)
    python = {name for name in undefined if name.startswith(("Py", "_Py"))}
    assert python, "no Python C API symbol found: the audit reads the wrong table"
    assert python <= stable_abi_names(), f"outside Python's stable ABI: {sorted(python - stable_abi_names())}"
    exported = {name for kind, name in dynamic_symbols(library, "--defined-only") if kind in "TDBR"}
    assert exported == {"PyInit__C"}, f"exports beyond the module's init function: {sorted(exported)}"
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in needed and "libpython" not in needed, needed


@pytest.mark.parametrize("error, says", [
    (ImportError("libcudart.so.12: cannot open shared object file: No such file or directory"),
     "it needs libcudart.so.12, which torch"),
    (ImportError("/x/mmfs_fast/_C.abi3.so: undefined symbol: torch_new_shim_of_2_99"),
     "lacks torch_new_shim_of_2_99, which the extension calls"),
    (ImportError("something else\nwith a traceback-like second line"), "something else; rebuild"),
])
def test_a_wheel_that_cannot_load_says_why_in_one_line(error, says):
    why = _backend._why_it_does_not_load(error)
    assert says in why and "\n" not in why and "pip install --no-build-isolation ." in why


@built
@pytest.mark.parametrize("attribute, value, says", [
    ("cuda", None, "is a CPU-only build"),
    ("__version__", "2.10.0+cu130", "is older than 2.11, the oldest release whose stable ABI"),
])
def test_the_extension_is_not_loaded_where_it_cannot_work(monkeypatch, attribute, value, says):
    """Checked before loading, so the loader's own error (a missing libtorch_cuda.so, an
    undefined symbol) never reaches the user; the backends fall back with the reason."""
    monkeypatch.setattr(torch.version if attribute == "cuda" else torch, attribute, value)
    with pytest.warns(RuntimeWarning, match="The triton and ref backends remain") as caught:
        module, why = _backend._load_cuda_extension()
    assert module is None and says in why and "\n" not in why
    assert len(caught) == 1 and says in str(caught[0].message)


def source_tree_copy(destination: Path) -> Path:
    """The repository as a fresh clone has it: no build outputs, venvs or dev symlinks."""
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "out", ".whl"}

    def ignore(folder, names):
        return [n for n in names if n in skip or n.endswith((".so", ".egg-info")) or os.path.islink(Path(folder, n))]

    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


def venv_site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@pytest.mark.slow
@built
def test_isolated_wheel_installs_and_loads_in_a_fresh_venv(tmp_path):
    """`pip wheel .` with build isolation (pyproject's build-system installs torch in the build's
    own environment), then the wheel in a new venv, run from outside the source tree. The new
    venv reaches the project's installed runtime packages (torch, ...) through a .pth file
    instead of a second multi-GB torch install; the wheel itself goes into the venv's own
    site-packages, which comes first on sys.path."""
    source = source_tree_copy(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_NO_BUILD_ISOLATION")}
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", "2")
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                   env=env, check=True, cwd=tmp_path)
    wheel, = wheels.glob("*.whl")
    assert wheel.name.startswith("mmfs_fast-") and wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), wheel.name
    files = zipfile.ZipFile(wheel).namelist()
    assert "mmfs_fast/_C.abi3.so" in files and "mmfs_fast/kernels/upfirdn2d.py" in files
    assert not [f for f in files if f.startswith(("kernels/", "tests/", "csrc/"))], "stray top-level files"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    runtime = Path(torch.__file__).resolve().parent.parent
    (venv_site_packages(venv) / "project_runtime.pth").write_text(f"{runtime}\n")
    python = venv / "bin" / "python"
    # --ignore-installed: a mmfs_fast installed beside torch stays untouched; the wheel goes into the venv
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], env=env, check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], env=env, check=True,
                   cwd=tmp_path)
    where = subprocess.run([str(python), "-c", "import mmfs_fast; print(mmfs_fast.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv_site_packages(venv)), where

    run = subprocess.run([str(venv / "bin" / "mmfs-fast"), "info"], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)["cuda_extension"]
    assert report["loaded"] and report["off_because"] is None, report
    assert report["built_with_torch"] == torch.__version__ and report["runs_with_torch"] == torch.__version__
    assert report["cuda_kernels"] == {op: True for op in _cuda.OPS}, report
