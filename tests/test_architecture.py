"""The layout's rules: every module imports, imports point one way (no cycles), the Engine
API stays small, the demodulation formula has one home, and a render makes no device→host sync."""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmfs_fast
from mmfs_fast import MMFS, Engine, to_pil
from mmfs_fast.models import Stylizer, StylizerConfig

ROOT = Path(mmfs_fast.__file__).parent
OPTIONAL = ("mmfs_fast.kernels", "mmfs_fast.serve", "mmfs_fast.video", "mmfs_fast.faces", "mmfs_fast._C")


def module_files() -> dict[str, Path]:
    files = {}
    for path in ROOT.rglob("*.py"):
        if "kernels" in path.relative_to(ROOT).parts:
            continue
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, files: dict[str, Path]) -> set[str]:
    """The mmfs_fast modules ``name`` imports, at module level or inside functions
    (``from package import module`` is an import of the module, not of the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
    return {m for m in found if m in files and m != name}


def test_every_module_imports():
    for info in pkgutil.walk_packages(mmfs_fast.__path__, "mmfs_fast."):
        if info.name.endswith("__main__"):
            continue  # runs its command on import
        try:
            importlib.import_module(info.name)
        except ImportError as e:  # an optional extra that is not installed here
            if not info.name.startswith(OPTIONAL):
                raise AssertionError(f"{info.name}: {e}") from e


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycles():
    files = module_files()
    graph = {name: imports_of(name, path, files) for name, path in files.items()}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


def test_cli_is_imported_by_nothing_and_kernels_not_from_ops():
    files = module_files()
    importers = [name for name, path in files.items() if "mmfs_fast.cli" in imports_of(name, path, files)]
    assert importers == []
    kernel_files = list((ROOT / "kernels").glob("*.py"))
    assert kernel_files, f"no Triton kernel modules under {ROOT / 'kernels'}"
    for path in kernel_files:
        modules = [n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.startswith("mmfs_fast.ops")], path


def test_engine_api_stays_small_and_the_demodulation_has_one_home():
    assert len((ROOT / "engine" / "engine.py").read_text().splitlines()) <= 400
    homes = [path for path in ROOT.rglob("*.py") if "DEMOD_EPS" in path.read_text()]
    assert homes == [ROOT / "ops" / "_common.py"]


def test_demodulation_stays_fp32_under_autocast():
    from mmfs_fast.ops import demodulation, weight_energy

    torch.manual_seed(0)
    weight, styles = torch.randn(8, 600, 3, 3) / 70, torch.randn(4, 600) * 300  # Σ(W·s)² far above fp16's range
    want = torch.rsqrt((weight.double()[None] * styles.double()[:, None, :, None, None]).square().sum((2, 3, 4))
                       + 1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = demodulation(styles.bfloat16().float(), weight_energy(weight))
    assert got.dtype == torch.float32
    want_rounded = torch.rsqrt((weight.double()[None] * styles.bfloat16().double()[:, None, :, None, None])
                               .square().sum((2, 3, 4)) + 1e-8)
    torch.testing.assert_close(got.double(), want_rounded, rtol=1e-5, atol=0)
    assert (got.double() - want).abs().max() < 1e-2 * want.abs().max()
    half = demodulation(styles.half(), weight_energy(weight.half()))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
            torch.ops.aten.item.default}


class FailOnSync(TorchDispatchMode):
    """Fails on the ops that read a tensor's value back to the host (a sync on a GPU), and on
    the reads that bypass the dispatcher (``tolist``, ``numpy``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            raise AssertionError(f"device→host read: {func}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name in self._saved:
            setattr(torch.Tensor, name, _fail_on_read(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def _fail_on_read(name):
    def read(*args, **kwargs):
        raise AssertionError(f"device→host read: Tensor.{name}")
    return read


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(Stylizer(size=32, ngf=4, style_dim=16, n_mlp=1, clip_mapper=False), device="cpu")


@torch.no_grad()
def test_a_render_makes_no_host_sync(engine):
    faces, w_plus = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 10, 16)
    with FailOnSync():
        out = engine.stylize(faces, w_plus)
        engine.stylize(faces, w_plus, noise="random")
        engine.style_from_z(torch.randn(2, 16))
    torch.testing.assert_close(out, engine.stylize(faces, w_plus))
    for read in (lambda: torch.isfinite(faces).all().item(), lambda: torch.isfinite(faces).all().tolist()):
        with pytest.raises(AssertionError, match="device→host"), FailOnSync():  # the mode does catch a read
            read()
    checking = Engine(Stylizer(size=32, ngf=4, style_dim=16, n_mlp=1, clip_mapper=False), device="cpu",
                      check_finite=True)
    with pytest.raises(AssertionError, match="device→host"), FailOnSync():  # ... and the opt-in check's read
        checking.stylize(faces, w_plus)


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "plain"])
@torch.no_grad()
def test_the_api_renders_without_host_sync(engine):
    config = StylizerConfig(size=32, ngf=4, style_dim=16, n_mlp=1)
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        mmfs = MMFS.load(random_init=True, config=config, device="cpu", engine=engine)
        checking = MMFS.load(random_init=True, config=config, device="cpu", engine=engine, check_finite=True)
    faces, w_plus = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(1, 10, 16)
    pil_faces = [to_pil(f) for f in faces]
    with FailOnSync():
        rendered = mmfs.render(faces, w_plus, noise="zero")
        mmfs.render(faces, w_plus[0])  # a (10, D) style, random noise
        # the copy back to the host is its one sync (host tensors are range-checked on the host)
        seeded = mmfs.stylize(pil_faces, seed=3, batch_size=1)
        mmfs.style(w_plus=w_plus)
    torch.testing.assert_close(rendered, mmfs.render(faces, w_plus, noise="zero"))
    torch.testing.assert_close(seeded, mmfs.stylize(pil_faces, seed=3))
    with pytest.raises(AssertionError, match="device→host"), FailOnSync():  # the opt-in check reads
        checking.render(faces, w_plus)
    with pytest.raises(ValueError, match="w_plus contains NaN"):
        checking.render(faces, torch.full((1, 10, 16), float("nan")))
    assert mmfs.render(faces, torch.full((1, 10, 16), float("nan"))).isnan().all()  # unchecked: NaN out
    with pytest.raises(ValueError, match="w_plus contains NaN"):  # stylize comes back to the host: it checks
        mmfs.stylize(list(faces), w_plus=torch.full((1, 10, 16), float("nan")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_a_gpu_render_makes_no_host_sync():
    torch.manual_seed(0)
    engine = Engine(Stylizer(size=64, ngf=8, style_dim=64, n_mlp=1, clip_mapper=False), cuda_graphs=False)
    faces, w_plus = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1, torch.randn(2, 10, 64, device="cuda")
    mmfs = MMFS(Stylizer(size=64, ngf=8, style_dim=64, n_mlp=1, clip_mapper=False), engine=engine)
    engine.stylize(faces, w_plus)  # first-call work (cuDNN autotuning) outside the check
    mmfs.render(faces, w_plus)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.stylize(faces, w_plus)
        mmfs.render(faces, w_plus, noise="zero")
        mmfs.render(faces, w_plus[:1])  # one style for every face, random noise drawn on the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
