"""The index math of csrc/ checked on the CPU, without a GPU: the kernels' own source, with
the launch constants of common.h and upfirdn2d.cu's launch() (its choice of kernel and grid),
cut out of the files and built for the CPU with tests/cuda_host_harness.cpp (g++, real threads
meeting at __syncthreads), then compared with the ref ops. Outputs start as NaN, so an
output the kernels never write shows.

The rest of the host code (output sizes and layouts, the modulated convolution's sequence of
modulation, cuDNN convolution and demodulation, bias_act's dense copies and channel stride)
needs ATen and CUDA: the *_host functions below mirror it in Python around the compiled
kernels. The backward formulas of mmfs_fast/ops/_cuda.py are checked with
gradcheck/gradgradcheck around the compiled kernels.
"""
import ctypes
import math
import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfs_fast.ops import _cuda
from mmfs_fast.ops.bias_act import bias_act_ref
from mmfs_fast.ops._common import DEMOD_EPS
from mmfs_fast.ops.modulated_conv2d import modulated_conv2d_ref
from mmfs_fast.ops.upfirdn2d import upfirdn2d_ref


def flat(t: torch.Tensor) -> np.ndarray:
    """The storage of a dense tensor, as the kernel sees it through data_ptr."""
    assert t.storage_offset() == 0
    return t.detach().as_strided((t.numel(),), (1,)).numpy().copy()


def output_like(tensor: torch.Tensor) -> np.ndarray:
    """A kernel's output buffer for ``tensor``'s storage: NaN until written."""
    return np.full(tensor.numel(), np.nan)


def result(data: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    assert not np.isnan(data).any(), "some outputs were never written"
    return torch.as_strided(torch.from_numpy(data), like.shape, like.stride())


def empty_with_layout_of(x: torch.Tensor, shape) -> torch.Tensor:
    """common.h's rule: outputs are channels_last exactly when x is channels_last and not also contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, dtype=x.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------- csrc/, compiled for the CPU

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# What is compiled of each file: from the first marker to the second (exclusive).
SPANS = [
    ("common.h", "constexpr int kThreads", "inline Strides4 strides4("),  # kThreads, ceil_div, grid_stride_blocks
    ("upfirdn2d.cu", "namespace {\n", "}  // namespace\n\nat::Tensor upfirdn2d("),  # kernels and launch()
    ("modulated_conv2d.cu", "namespace {\n", "// dst (dense, from empty_with_layout_of)"),  # kernels only
    ("bias_act.cu", "namespace {\n", "// x itself when the kernel"),  # kernels only
]


def cut(name: str, begin: str, end: str) -> str:
    source = (CSRC / name).read_text()
    assert begin in source and end in source, f"csrc/{name} changed: update SPANS"
    start = source.index(begin) + (len(begin) if begin.startswith("namespace") else 0)
    text = source[start:source.index(end)]
    return f"namespace {{\n{text}\n}}  // namespace\n" if begin.startswith("namespace") else text


def rewrite_launches(source: str) -> str:
    """``kernel<<<grid, threads, shared, stream>>>(args)`` → ``cuda_launch("kernel", grid, threads, shared, stream,
    [&] { kernel(args); })``"""
    out, pos = [], 0
    for match in re.finditer(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<", source):
        if match.start() < pos:
            continue
        config_end = source.index(">>>(", match.end())
        depth, i = 1, config_end + 4
        while depth:  # the call's closing parenthesis
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        grid, threads, shared, stream = split_top_level(source[match.end():config_end])
        kernel, args = match.group(1), source[config_end + 4:i - 1]
        out.append(source[pos:match.start()])
        out.append(f'cuda_launch("{kernel}", {grid}, {threads}, {shared}, {stream}, [&] {{ {kernel}({args}); }})')
        pos = i
    return "".join(out) + source[pos:]


def split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def build_csrc_for_the_cpu(workdir: Path) -> ctypes.CDLL:
    inc = rewrite_launches("".join(cut(*span) for span in SPANS))
    assert "<<<" not in inc
    (workdir / "kernels.inc").write_text(inc)
    harness = Path(__file__).with_name("cuda_host_harness.cpp")
    library = workdir / "kernels.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", f"-I{workdir}", str(harness), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.launched_kernel.restype = ctypes.c_char_p
    lib.blocks_for.restype = ctypes.c_uint
    return lib


def pointer(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def int64s(values):
    return np.array(values, dtype=np.int64)


@pytest.fixture(scope="module")
def csrc(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return build_csrc_for_the_cpu(tmp_path_factory.mktemp("csrc_for_the_cpu"))


def last_launch(lib) -> tuple[str, tuple[int, int, int], int]:
    grid = (ctypes.c_uint * 4)()
    lib.launched_grid(grid)
    return lib.launched_kernel().decode(), tuple(grid[:3]), grid[3]


# ---------------------------------------------------------------- upfirdn2d.cu

def upfirdn2d_host(lib, x, kernel, up, down, pad, grid_z=None):
    """upfirdn2d(): the output size and layout, then the compiled launch() (or, with grid_z,
    the tiled kernel on that many plane blocks)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out_h = (h * up + pad[2] + pad[3] - kh) // down + 1
    out_w = (w * up + pad[0] + pad[1] - kw) // down + 1
    like = empty_with_layout_of(x, (n, c, out_h, out_w))
    sizes = np.array([c, n * c, h, w, out_h, out_w, up, down, pad[0], pad[2], kh, kw], dtype=np.int32)
    data, taps = output_like(like), kernel.float().flatten().numpy()
    args = (pointer(flat(x)), pointer(taps), pointer(data), pointer(int64s(x.stride())), pointer(int64s(like.stride())),
            pointer(sizes))
    if grid_z is None:
        lib.upfirdn2d(*args)
    else:
        lib.upfirdn2d_tiled_on_grid(*args, ctypes.c_uint(grid_z))
    return result(data, like)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


UPFIRDN2D_CASES = [
    # (up, down, pad, kernel shape, input size): the tiled kernel's three variants with the pads
    # MMFS uses, crops, odd sizes spanning several tiles; then the generic kernel.
    (2, 1, (2, 1, 2, 1), (4, 4), (35, 33)),
    (2, 1, (1, 2, 2, 1), (4, 4), (3, 5)),
    (2, 1, (-3, 4, 5, -2), (4, 4), (17, 34)),
    (1, 1, (1, 1, 1, 1), (4, 4), (40, 37)),
    (1, 1, (2, 2, 2, 2), (4, 4), (1, 1)),
    (1, 1, (-1, 2, 3, -2), (4, 4), (40, 37)),
    (1, 2, (1, 1, 1, 1), (4, 4), (67, 66)),
    (1, 2, (2, 1, -2, 3), (4, 4), (9, 70)),
    (1, 2, (0, 0, 0, 0), (4, 4), (4, 4)),
    (3, 2, (2, -1, 0, 3), (5, 3), (9, 7)),
    (2, 2, (1, 2, 0, 3), (4, 4), (10, 11)),
    (1, 3, (-1, 2, 3, -2), (4, 3), (13, 8)),
    (1, 1, (0, 0, 0, 0), (1, 1), (5, 6)),
    (4, 1, (3, 4, 5, 6), (32, 32), (9, 8)),
]


TILED = {(2, 1): "upfirdn2d_tiled_kernel<scalar_t, 2, 1>", (1, 2): "upfirdn2d_tiled_kernel<scalar_t, 1, 2>",
         (1, 1): "upfirdn2d_tiled_kernel<scalar_t, 1, 1>"}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("up,down,pad,kernel_shape,size", UPFIRDN2D_CASES)
def test_upfirdn2d_kernels_match_ref(csrc, up, down, pad, kernel_shape, size, channels_last):
    x = layout(rand(2, 3, *size), channels_last)
    kernel = rand(*kernel_shape, seed=1).float().double()  # the kernels' taps are float32
    got = upfirdn2d_host(csrc, x, kernel, up, down, pad)
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, up, down, pad), rtol=1e-12, atol=1e-12)
    # launch(): the tiled kernel for the 4×4 FIR in its three (up, down), one block per 32×32 tile and plane
    name, grid, threads = last_launch(csrc)
    out_h, out_w = got.shape[2:]
    if kernel_shape == (4, 4) and (up, down) in TILED:
        assert (name, grid) == (TILED[up, down], (-(-out_w // 32), -(-out_h // 32), 6))
    else:
        assert (name, grid) == ("upfirdn2d_generic_kernel<scalar_t>", (csrc.blocks_for(got.numel()), 1, 1))
    assert threads == 256
    # a (1, 1) image is contiguous in both layouts, and then the output is plainly contiguous
    expected_format = torch.channels_last if channels_last and size != (1, 1) else torch.contiguous_format
    assert got.is_contiguous(memory_format=expected_format)


def test_upfirdn2d_tiled_kernel_loops_over_more_planes_than_the_grid(csrc):
    x, kernel = rand(1, 5, 6, 7), rand(4, 4, seed=1).float().double()
    got = upfirdn2d_host(csrc, x, kernel, 2, 1, (2, 1, 2, 1), grid_z=2)  # 5 planes on 2 blocks, as past 65535
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, 2, 1, (2, 1, 2, 1)), rtol=1e-12, atol=1e-12)


def test_grid_stride_blocks_cover_the_work_up_to_the_cap(csrc):
    assert [csrc.blocks_for(n) for n in (0, 1, 256, 257, 256 << 20, (256 << 20) + 1)] == [1, 1, 1, 2, 1 << 20, 1 << 20]


# ---------------------------------------------------------------- modulated_conv2d.cu

def modconv_host(lib, x, weight, styles, demodulate, transposed, stride, padding):
    """modulated_conv2d(): modulation (scale_channels_kernel), the cuDNN convolution (here
    F.conv2d / F.conv_transpose2d in float64), demodulation (demod_kernel, scale_channels_kernel)."""
    batch, in_channels = x.shape[:2]
    out_channels, k = weight.shape[0], weight.shape[2]
    styles_f = flat(styles.float().contiguous())
    modulated = scale_channels_host(lib, x, styles_f, empty_with_layout_of(x, x.shape))
    if transposed:
        conv = F.conv_transpose2d(modulated, weight.transpose(0, 1), stride=stride, padding=padding)
    else:
        conv = F.conv2d(modulated, weight, stride=stride, padding=padding)
    out = empty_with_layout_of(x, conv.shape)
    if not demodulate:
        return conv if conv.stride() == out.stride() else scale_channels_host(lib, conv, None, out)
    demod = np.full(batch * out_channels, np.nan, dtype=np.float32)
    lib.demod(pointer(flat(weight.float().contiguous())), pointer(styles_f), pointer(demod), batch, out_channels,
              in_channels, k * k)
    assert not np.isnan(demod).any(), "some demodulation factors were never written"
    return scale_channels_host(lib, conv, demod, out)


def scale_channels_host(lib, src, scale, dst):
    """scale_channels(): dst, dense in one layout, is walked in its memory order."""
    n, c, h, w = dst.shape
    data = output_like(dst)
    lib.scale_channels(pointer(flat(src)), pointer(int64s(src.stride())), pointer(scale), pointer(data),
                       ctypes.c_int64(data.size), c, h, w, ctypes.c_bool(not dst.is_contiguous()),
                       ctypes.c_uint(2))  # 2 blocks: the grid-stride loop takes several rounds
    return result(data, dst)


def raw_modconv_ref(x, weight, styles, demodulate, transposed, stride, padding):
    """The semantics of torch.ops.mmfs_fast.modulated_conv2d (ops.h) in plain torch."""
    xs = x * styles[:, :, None, None]
    if transposed:
        out = F.conv_transpose2d(xs, weight.transpose(0, 1), stride=stride, padding=padding)
    else:
        out = F.conv2d(xs, weight, stride=stride, padding=padding)
    if demodulate:
        sum_sq = styles.square() @ weight.square().sum((2, 3)).T
        out = out * torch.rsqrt(sum_sq + DEMOD_EPS)[:, :, None, None]
    return out


MODCONV_CASES = [
    # (batch, in, out channels, k, size, transposed, stride, padding)
    (2, 5, 6, 3, (7, 9), False, 1, 1),
    (1, 67, 129, 3, (17, 13), False, 1, 1),
    (3, 8, 4, 3, (5, 6), True, 2, 0),
    (2, 70, 3, 1, (7, 9), False, 1, 0),
    (2, 5, 6, 3, (8, 9), False, 2, 0),
    (1, 3, 65, 3, (4, 5), True, 2, 0),
    (2, 4, 3, 4, (5, 4), True, 3, 1),
    (1, 3, 2, 5, (6, 7), False, 2, 2),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("demodulate", [True, False], ids=["demod", "plain"])
@pytest.mark.parametrize("batch,in_channels,out_channels,k,size,transposed,stride,padding", MODCONV_CASES)
def test_modconv_kernel_matches_ref(csrc, batch, in_channels, out_channels, k, size, transposed, stride, padding,
                                    demodulate, channels_last):
    x = layout(rand(batch, in_channels, *size), channels_last)
    weight = rand(out_channels, in_channels, k, k, seed=1).float().double()  # demod_kernel reads float32 copies
    styles = rand(batch, in_channels, seed=2).float().double()
    args = (demodulate, transposed, stride, padding)
    got = modconv_host(csrc, x, weight, styles, *args)
    want = raw_modconv_ref(x, weight, styles, *args)
    # a float32 demod: index errors are of order one
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("to_channels_last", [False, True], ids=["to_nchw", "to_nhwc"])
def test_scale_channels_copies_into_the_other_layout(csrc, to_channels_last):
    """No scale: the copy modulated_conv2d makes when cuDNN's output layout is not the op's."""
    src = layout(rand(2, 5, 4, 3), not to_channels_last)
    dst = torch.empty(2, 5, 4, 3, dtype=torch.float64,
                      memory_format=torch.channels_last if to_channels_last else torch.contiguous_format)
    got = scale_channels_host(csrc, src, None, dst)
    assert torch.equal(got, src) and got.stride() == dst.stride()


# ---------------------------------------------------------------- bias_act.cu

def bias_act_host(lib, x, bias, slope, gain, clamp, dim, grad=None):
    """run<kGrad>(), kGrad = grad is not None: x walked in memory order (a contiguous copy when
    dense in neither layout), grad with x's strides, the bias entry of memory offset i is
    (i / stride(dim)) % size(dim)."""
    x = x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()
    if grad is not None and grad.stride() != x.stride():
        grad = torch.empty_like(x).copy_(grad)
    data = output_like(x)
    channel_stride = x.stride(dim) if x.shape[dim] > 1 else 1
    bias = None if bias is None else bias.detach().to(x.dtype).numpy()
    lib.bias_act(pointer(flat(x)), pointer(bias), None if grad is None else pointer(flat(grad)), pointer(data),
                 ctypes.c_int64(x.numel()), ctypes.c_int64(channel_stride), ctypes.c_int64(x.shape[dim]),
                 ctypes.c_double(slope), ctypes.c_double(gain), ctypes.c_double(clamp or 0.0),
                 ctypes.c_bool(clamp is not None), ctypes.c_uint(2))  # 2 blocks: the grid-stride loop takes rounds
    return result(data, x)


@pytest.mark.parametrize("shape,dim,memory_format", [
    ((3, 5, 6, 7), 1, torch.contiguous_format), ((3, 5, 6, 7), 1, torch.channels_last),
    ((3, 5, 6, 7), 3, torch.channels_last), ((3, 5, 1, 1), 1, torch.channels_last), ((33, 7), 1, None),
    ((4, 1, 5), 1, None), ((6, 5), 0, "transposed")])
def test_bias_act_kernel_matches_ref(csrc, shape, dim, memory_format):
    x = rand(*shape)
    if memory_format == "transposed":  # dense but in neither layout: the kernel walks a copy
        x = rand(*shape[::-1]).t()
    elif memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    bias = rand(shape[dim], seed=1)
    for slope, act, clamp in [(0.2, "lrelu", None), (0.0, "relu", 0.7), (1.0, "linear", 0.5)]:
        want = bias_act_ref(x, bias, act, slope, math.sqrt(2), clamp, dim)
        got = bias_act_host(csrc, x.detach(), bias, slope, math.sqrt(2), clamp, dim)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        upstream = rand(*shape, seed=2)
        want_grad, = torch.autograd.grad(want, x, upstream)
        got_grad = bias_act_host(csrc, x.detach(), bias, slope, math.sqrt(2), clamp, dim, upstream)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the Python glue of _cuda.py

@pytest.fixture
def compiled_ops(csrc, monkeypatch):
    """torch.ops.mmfs_fast as _cuda.py sees it, run by the compiled kernels."""
    ops = types.SimpleNamespace(
        upfirdn2d=lambda x, kernel, up, down, pad: upfirdn2d_host(csrc, x, kernel, up, down, pad),
        modulated_conv2d=lambda *args: modconv_host(csrc, *args))
    monkeypatch.setattr(_cuda, "_ops", ops)
    return ops


@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
def test_cuda_backend_resampling_paths_match_ref(compiled_ops, up, down):
    """_cuda.modulated_conv2d's composition (transposed conv + blur, blur + strided conv) on the
    compiled kernels equals the official ref."""
    x = rand(2, 4, 7, 6)
    weight, styles = rand(5, 4, 3, 3, seed=1).float().double(), rand(2, 4, seed=2).float().double()
    fir = torch.outer(*[torch.tensor([1.0, 2.0, 4.0, 1.0], dtype=torch.float64)] * 2)
    fir = fir / fir.sum()  # asymmetric: a wrong flip shows
    padding = 1 if up == down == 1 else 0
    got = _cuda.modulated_conv2d(x, weight, styles, True, up, down, padding, fir)
    want = modulated_conv2d_ref(x, weight, styles, True, up, down, padding, fir)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())  # float32 demod


def autograd_op(forward, setup_context, backward):
    """An op with the given forward and _cuda.py's setup_context and backward, as
    torch.library.register_autograd wires them around the CUDA kernel."""
    return type(forward.__name__, (torch.autograd.Function,), dict(
        forward=staticmethod(lambda *args: forward(*args)),  # inputs as called, without forward's defaults
        setup_context=staticmethod(setup_context),
        backward=staticmethod(backward))).apply


@pytest.fixture
def autograd_ops(csrc, monkeypatch):
    """torch.ops.mmfs_fast as _cuda.py sees it, with the compiled kernels as forwards (but
    modulated_conv2d's, whose float32 weights would blur numerical derivatives)."""

    def upfirdn2d(x, kernel, up, down, pad):
        return upfirdn2d_host(csrc, x, kernel, up, down, pad)

    def bias_act(x, bias, slope, gain, clamp, dim):
        return bias_act_host(csrc, x, bias, slope, gain, clamp, dim)

    def bias_act_grad(grad, x, bias, slope, gain, clamp, dim):
        return bias_act_host(csrc, x, bias, slope, gain, clamp, dim, grad)

    ops = types.SimpleNamespace(
        upfirdn2d=autograd_op(upfirdn2d, _cuda._upfirdn2d_setup, _cuda._upfirdn2d_backward),
        bias_act=autograd_op(bias_act, _cuda._bias_act_setup, _cuda._bias_act_backward),
        bias_act_grad=autograd_op(bias_act_grad, _cuda._bias_act_grad_setup, _cuda._bias_act_grad_backward),
        modulated_conv2d=autograd_op(raw_modconv_ref, _cuda._modulated_conv2d_setup,
                                     _cuda._modulated_conv2d_backward))
    monkeypatch.setattr(_cuda, "_ops", ops)
    return ops


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (3, 2, (2, -1, 0, 3))])
def test_upfirdn2d_backward_formula(autograd_ops, up, down, pad):
    x = rand(1, 2, 6, 5).requires_grad_()
    kernel = rand(4, 3, seed=1)
    op = lambda x: autograd_ops.upfirdn2d(x, kernel, up, down, pad)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(op, (x,), fast_mode=True)


@pytest.mark.parametrize("slope,clamp", [(1.0, None), (0.0, 0.7), (0.2, None), (0.2, 0.7)])
def test_bias_act_backward_formula(autograd_ops, slope, clamp):
    x = rand(3, 4, 5).requires_grad_()
    bias = rand(4, seed=1).requires_grad_()
    op = lambda x, bias: autograd_ops.bias_act(x, bias, slope, math.sqrt(2), clamp, 1)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, bias), fast_mode=True)
    assert torch.autograd.gradgradcheck(op, (x, bias), fast_mode=True)


@pytest.mark.parametrize("demodulate", [True, False], ids=["demod", "plain"])
@pytest.mark.parametrize("transposed,stride,padding", [(False, 1, 1), (True, 2, 0), (False, 2, 0)])
def test_modconv_backward_formula(autograd_ops, demodulate, transposed, stride, padding):
    x = rand(2, 3, 5, 4).requires_grad_()
    weight = rand(2, 3, 3, 3, seed=1).requires_grad_()
    styles = rand(2, 3, seed=2).requires_grad_()
    op = lambda *t: autograd_ops.modulated_conv2d(*t, demodulate, transposed, stride, padding)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, weight, styles), fast_mode=True)
    assert torch.autograd.gradgradcheck(op, (x, weight, styles), fast_mode=True)


def test_fake_kernels_agree_with_the_compiled_outputs(csrc):
    """_cuda.py's fake kernels (torch.compile's view of the ops) against the shapes and
    strides that the compiled kernels fill, laid out by common.h's rule."""
    for x in (rand(2, 3, 9, 7).contiguous(memory_format=torch.channels_last), rand(2, 3, 9, 7)):
        for pad, up, down in [((2, 1, 2, 1), 2, 1), ((-1, 2, 3, -2), 1, 2), ((2, -1, 0, 3), 3, 2)]:
            kernel = rand(4, 3, seed=1)
            fake = _cuda._upfirdn2d_fake(x, kernel, up, down, pad)
            got = upfirdn2d_host(csrc, x, kernel, up, down, pad)
            assert fake.shape == got.shape and fake.stride() == got.stride()
        weight, styles = rand(4, 3, 3, 3), rand(2, 3)
        for transposed, stride, padding in [(False, 1, 1), (True, 2, 0), (False, 2, 0)]:
            fake = _cuda._modulated_conv2d_fake(x, weight, styles, True, transposed, stride, padding)
            got = modconv_host(csrc, x, weight, styles, True, transposed, stride, padding)
            assert fake.shape == got.shape and fake.stride() == got.stride()
