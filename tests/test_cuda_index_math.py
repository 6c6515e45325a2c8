"""The index math of csrc/ checked on the CPU, without a GPU, two ways.

Transcribed: each kernel of csrc/upfirdn2d.cu, csrc/modulated_conv2d.cu and csrc/bias_act.cu
is written out here block by block and thread by thread (threads vectorised with numpy, C's
truncating `/` and `%` kept). Shared-memory tiles start as NaN and every read of them is
bounds-checked, so a too-small halo or an unloaded entry shows; outputs count their writes,
so a missed or doubled output shows.

Compiled: the kernels' own source, cut out of the .cu files and built for the CPU with
tests/cuda_host_harness.cpp (g++, real threads meeting at __syncthreads).

Both run behind a transcription of the host code (output size, kernel choice, grid), read and
write flat buffers through the tensors' strides, and are compared with the ref ops. The
backward formulas of mmfs_fast/ops/_cuda.py are checked with gradcheck/gradgradcheck around
the transcribed kernels.
"""
import ctypes
import math
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

THREADS = 256


def c_div(a, b):
    """C's integer division (truncation toward zero), b > 0."""
    a = np.asarray(a)
    return np.sign(a) * (np.abs(a) // b)


def c_mod(a, b):
    return np.asarray(a) - b * c_div(a, b)


def ceil_div(a, b):
    return (a + b - 1) // b


def flat(t: torch.Tensor) -> np.ndarray:
    """The storage of a dense tensor, as the kernel sees it through data_ptr."""
    assert t.storage_offset() == 0
    return t.detach().as_strided((t.numel(),), (1,)).numpy().copy()


class Output:
    """A kernel's output buffer, laid out like ``tensor``; NaN until written, and each offset
    counts its writes."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.data = np.full(self.tensor.numel(), np.nan)
        self.writes = np.zeros(self.tensor.numel(), dtype=np.int64)
        self.strides = self.tensor.stride()

    def write(self, offsets, values):
        np.add.at(self.writes, offsets, 1)
        self.data[offsets] = values

    def result(self) -> torch.Tensor:
        assert (self.writes == 1).all(), "some outputs were written never or twice"
        assert not np.isnan(self.data).any(), "some outputs were never written"
        return torch.as_strided(torch.from_numpy(self.data), self.tensor.shape, self.strides)


def offset(strides, n, c, y, x):
    return n * strides[0] + c * strides[1] + y * strides[2] + x * strides[3]


# ---------------------------------------------------------------- the kernels' own source, compiled for the CPU

# Where each file's kernels begin and end: the device code between them is compiled, the host code is not.
KERNEL_SPANS = {
    "upfirdn2d.cu": ("namespace {\n", "template <typename scalar_t>\nvoid launch("),
    "modulated_conv2d.cu": ("namespace {\n", "// dst (dense, from empty_with_layout_of)"),
    "bias_act.cu": ("namespace {\n", "// x itself when the kernel"),
}
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def build_host_kernels(workdir: Path) -> ctypes.CDLL:
    spans = []
    for name, (begin, end) in KERNEL_SPANS.items():
        source = (CSRC / name).read_text()
        assert begin in source and end in source, f"csrc/{name} changed: update KERNEL_SPANS"
        start = source.index(begin) + len(begin)
        spans.append(f"namespace {{\n{source[start:source.index(end)]}\n}}  // namespace\n")
    (workdir / "kernels.inc").write_text("".join(spans))
    harness = Path(__file__).with_name("cuda_host_harness.cpp")
    library = workdir / "kernels.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", f"-I{workdir}", str(harness), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def pointer(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def int64s(values):
    return np.array(values, dtype=np.int64)


class CompiledKernels:
    """The kernels of csrc/ built by build_host_kernels, behind the transcribed kernels' interface."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library

    @staticmethod
    def _collect(out, data):
        """Hands what the kernel wrote to ``out``: the NaN it started as marks what it did not write."""
        out.write(np.arange(data.size), data)

    def upfirdn2d_tiled(self, p, grid):
        self._upfirdn2d(p, True, grid)

    def upfirdn2d_generic(self, p, blocks):
        self._upfirdn2d(p, False, (blocks, 1, 1))

    def _upfirdn2d(self, p, tiled, grid):
        sizes = np.array([p.channels, p.planes, p.in_h, p.in_w, p.out_h, p.out_w, p.up, p.down, p.pad_x0, p.pad_y0,
                          p.kernel_h, p.kernel_w], dtype=np.int32)
        data = np.full(p.out.data.size, np.nan)
        in_stride, out_stride = int64s(p.x_stride), int64s(p.out.strides)
        self.library.upfirdn2d(pointer(p.x), pointer(p.taps), pointer(data), pointer(in_stride), pointer(out_stride),
                               pointer(sizes), ctypes.c_int(tiled), *map(ctypes.c_uint, grid))
        self._collect(p.out, data)

    def demod(self, weight, styles, batch, out_channels, in_channels, taps):
        demod = np.full(batch * out_channels, np.nan, dtype=np.float32)
        self.library.demod(pointer(weight), pointer(styles), pointer(demod), batch, out_channels, in_channels, taps)
        return demod

    def scale_channels(self, src, src_stride, scale, out, channels, height, width, channels_last):
        data = np.full(out.data.size, np.nan)
        self.library.scale_channels(pointer(src), pointer(int64s(src_stride)), pointer(scale), pointer(data),
                                    ctypes.c_int64(data.size), channels, height, width, ctypes.c_bool(channels_last),
                                    ctypes.c_uint(2))  # 2 blocks: the grid-stride loop takes several rounds
        self._collect(out, data)

    def bias_act(self, x, bias, grad, out, channel_stride, channels, slope, gain, clamp):
        data = np.full(x.size, np.nan)
        self.library.bias_act(pointer(x), pointer(bias), pointer(grad), pointer(data), ctypes.c_int64(x.size),
                              ctypes.c_int64(channel_stride), ctypes.c_int64(channels), ctypes.c_double(slope),
                              ctypes.c_double(gain), ctypes.c_double(clamp or 0.0), ctypes.c_bool(clamp is not None),
                              ctypes.c_uint(2))  # 2 blocks: the grid-stride loop takes several rounds
        self._collect(out, data)


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return CompiledKernels(build_host_kernels(tmp_path_factory.mktemp("cuda_host_kernels")))


@pytest.fixture(params=["transcribed", "compiled"])
def kernels(request):
    return TRANSCRIBED if request.param == "transcribed" else request.getfixturevalue("compiled_kernels")


# ---------------------------------------------------------------- upfirdn2d.cu

TILE, FIR = 32, 4


def kernel_floor_div(a, b):
    a = np.asarray(a)
    return c_div(np.where(a >= 0, a, a - b + 1), b)


def upfirdn2d_host(x, kernel, up, down, pad, kernels=None, max_grid_z=65535):
    """upfirdn2d() and launch(): output size, the kernel choice, the grid."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out_h = c_div(h * up + pad[2] + pad[3] - kh, down) + 1
    out_w = c_div(w * up + pad[0] + pad[1] - kw, down) + 1
    out = Output(_cuda._empty_with_layout_of(x, (n, c, int(out_h), int(out_w))))
    kernels = kernels or TRANSCRIBED
    p = types.SimpleNamespace(x=flat(x), x_stride=x.stride(), taps=kernel.float().flatten().numpy(), out=out,
                              channels=c, planes=n * c, in_h=h, in_w=w, out_h=int(out_h), out_w=int(out_w), up=up,
                              down=down, pad_x0=pad[0], pad_y0=pad[2], kernel_h=kh, kernel_w=kw)
    if kh == FIR and kw == FIR and up * down <= 2 and ceil_div(p.out_h, TILE) <= 65535:
        grid = (ceil_div(p.out_w, TILE), ceil_div(p.out_h, TILE), min(p.planes, max_grid_z))
        kernels.upfirdn2d_tiled(p, grid)
    else:
        kernels.upfirdn2d_generic(p, grid_stride_blocks(p.planes * p.out_h * p.out_w))
    return out.result()


def grid_stride_blocks(work):
    return min(max(ceil_div(work, THREADS), 1), 1 << 20)


def upfirdn2d_generic_kernel(p, blocks):
    idx = np.arange(p.planes * p.out_h * p.out_w)  # the grid-stride loop covers each index once, on any grid
    ox = idx % p.out_w
    oy = (idx // p.out_w) % p.out_h
    plane = idx // (p.out_w * p.out_h)
    n, c = plane // p.channels, plane % p.channels
    uy, ux = oy * p.down - p.pad_y0, ox * p.down - p.pad_x0
    acc = np.zeros(idx.shape)
    # for (ty = first_tap(uy, up); ty < kernel_h; ty += up), and likewise tx, for each thread
    ty_first = c_mod(c_mod(-uy, p.up) + p.up, p.up)
    tx_first = c_mod(c_mod(-ux, p.up) + p.up, p.up)
    for ty in range(p.kernel_h):
        for tx in range(p.kernel_w):
            active = (ty >= ty_first) & ((ty - ty_first) % p.up == 0)
            active &= (tx >= tx_first) & ((tx - tx_first) % p.up == 0)
            iy, ix = c_div(uy + ty, p.up), c_div(ux + tx, p.up)
            active &= (iy >= 0) & (iy < p.in_h) & (ix >= 0) & (ix < p.in_w)
            tap = p.taps[(p.kernel_h - 1 - ty) * p.kernel_w + (p.kernel_w - 1 - tx)]
            acc[active] += p.x[offset(p.x_stride, n, c, iy, ix)[active]] * tap
    p.out.write(offset(p.out.strides, n, c, oy, ox), acc)


def upfirdn2d_tiled_kernel(p, grid):
    up, down = p.up, p.down
    in_tile = ((TILE - 1) * down + FIR - 1) // up + 2
    flipped = np.array([p.taps[FIR * FIR - 1 - t] for t in range(FIR * FIR)]).reshape(FIR, FIR)
    i_load = np.arange(in_tile * in_tile)  # for (i = threadIdx.x; i < in_tile²; i += kThreads), all threads
    i_out = np.arange(TILE * TILE)
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                oy0, ox0 = by * TILE, bx * TILE
                iy0 = kernel_floor_div(oy0 * down - p.pad_y0, up)
                ix0 = kernel_floor_div(ox0 * down - p.pad_x0, up)
                for plane in range(bz, p.planes, grid[2]):
                    n, c = plane // p.channels, plane % p.channels
                    tile = np.full((in_tile, in_tile + 1), np.nan)
                    iy, ix = iy0 + i_load // in_tile, ix0 + i_load % in_tile
                    inside = (iy >= 0) & (iy < p.in_h) & (ix >= 0) & (ix < p.in_w)
                    values = np.zeros(i_load.shape)
                    values[inside] = p.x[offset(p.x_stride, n, c, iy, ix)[inside]]
                    tile[i_load // in_tile, i_load % in_tile] = values
                    oy, ox = oy0 + i_out // TILE, ox0 + i_out % TILE
                    live = (oy < p.out_h) & (ox < p.out_w)
                    oy, ox = oy[live], ox[live]
                    uy, ux = oy * down - p.pad_y0, ox * down - p.pad_x0
                    acc = np.zeros(oy.shape)
                    for ty in range(FIR):
                        for tx in range(FIR):
                            hit = (c_mod(uy + ty, up) == 0) & (c_mod(ux + tx, up) == 0)
                            row = kernel_floor_div(uy + ty, up)[hit] - iy0
                            col = kernel_floor_div(ux + tx, up)[hit] - ix0
                            assert ((row >= 0) & (row < in_tile) & (col >= 0) & (col < in_tile)).all(), "halo"
                            read = tile[row, col]
                            assert not np.isnan(read).any(), "read an unloaded tile entry"
                            acc[hit] += read * flipped[ty, tx]
                    p.out.write(offset(p.out.strides, n, c, oy, ox), acc)


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


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("up,down,pad,kernel_shape,size", UPFIRDN2D_CASES)
def test_upfirdn2d_kernels_match_ref(kernels, up, down, pad, kernel_shape, size, channels_last):
    x = layout(rand(2, 3, *size), channels_last)
    kernel = rand(*kernel_shape, seed=1).float().double()  # the kernels' taps are float32
    got = upfirdn2d_host(x, kernel, up, down, pad, kernels)
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, up, down, pad), rtol=1e-12, atol=1e-12)
    # a (1, 1) image is contiguous in both layouts, and then the output is plainly contiguous
    expected_format = torch.channels_last if channels_last and size != (1, 1) else torch.contiguous_format
    assert got.is_contiguous(memory_format=expected_format)


def test_upfirdn2d_tiled_kernel_loops_over_more_planes_than_the_grid(kernels):
    x, kernel = rand(1, 5, 6, 7), rand(4, 4, seed=1).float().double()
    got = upfirdn2d_host(x, kernel, 2, 1, (2, 1, 2, 1), kernels, max_grid_z=2)  # 5 planes on 2 blocks, as past 65535
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, 2, 1, (2, 1, 2, 1)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- modulated_conv2d.cu

def modconv_host(x, weight, styles, demodulate, transposed, stride, padding, kernels=None):
    """modulated_conv2d(): modulation (scale_channels_kernel), the cuDNN convolution (here
    F.conv2d / F.conv_transpose2d in float64), demodulation (demod_kernel, scale_channels_kernel)."""
    kernels = kernels or TRANSCRIBED
    batch, in_channels = x.shape[:2]
    out_channels, k = weight.shape[0], weight.shape[2]
    styles_f = flat(styles.float().contiguous())
    modulated = scale_channels_host(x, styles_f, _cuda._empty_with_layout_of(x, x.shape), kernels)
    if transposed:
        conv = F.conv_transpose2d(modulated, weight.transpose(0, 1), stride=stride, padding=padding)
    else:
        conv = F.conv2d(modulated, weight, stride=stride, padding=padding)
    out = _cuda._empty_with_layout_of(x, conv.shape)
    if not demodulate:
        return conv if conv.stride() == out.stride() else scale_channels_host(conv, None, out, kernels)
    demod = kernels.demod(flat(weight.float().contiguous()), styles_f, batch, out_channels, in_channels, k * k)
    return scale_channels_host(conv, demod, out, kernels)


def scale_channels_host(src, scale, dst, kernels):
    """scale_channels(): dst, dense in one layout, is walked in its memory order."""
    out = Output(dst)
    n, c, h, w = dst.shape
    kernels.scale_channels(flat(src), src.stride(), scale, out, c, h, w, not dst.is_contiguous())
    return out.result()


def demod_kernel(weight, styles, batch, out_channels, in_channels, taps):
    blocks = ceil_div(batch * out_channels * 32, THREADS)
    demod = np.full(batch * out_channels, np.nan)
    reduction = in_channels * taps
    for warp in range(blocks * THREADS // 32):
        if warp >= batch * out_channels:
            continue
        b, o = warp // out_channels, warp % out_channels
        lane_sums = np.zeros(32)
        for lane in range(32):
            r = np.arange(lane, reduction, 32)
            w = weight[o * reduction + r] * styles[b * in_channels + r // taps]
            lane_sums[lane] = (w * w).sum()
        demod[warp] = 1 / math.sqrt(lane_sums.sum() + 1e-8)
    return demod.astype(np.float32)


def scale_channels_kernel(src, src_stride, scale, out, channels, height, width, channels_last):
    i = np.arange(out.data.size)
    if channels_last:
        c, x, y, n = i % channels, (i // channels) % width, (i // (channels * width)) % height, \
            i // (channels * width * height)
    else:
        x, y, c, n = i % width, (i // width) % height, (i // (width * height)) % channels, \
            i // (width * height * channels)
    value = src[offset(src_stride, n, c, y, x)]
    out.write(i, value if scale is None else value * scale[n * channels + c])


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
def test_modconv_kernel_matches_ref(kernels, batch, in_channels, out_channels, k, size, transposed, stride, padding,
                                    demodulate, channels_last):
    x = layout(rand(batch, in_channels, *size), channels_last)
    weight = rand(out_channels, in_channels, k, k, seed=1).float().double()  # demod_kernel reads float32 copies
    styles = rand(batch, in_channels, seed=2).float().double()
    args = (demodulate, transposed, stride, padding)
    got = modconv_host(x, weight, styles, *args, kernels)
    want = raw_modconv_ref(x, weight, styles, *args)
    # a float32 demod: index errors are of order one
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("to_channels_last", [False, True], ids=["to_nchw", "to_nhwc"])
def test_scale_channels_copies_into_the_other_layout(kernels, to_channels_last):
    """No scale: the copy modulated_conv2d makes when cuDNN's output layout is not the op's."""
    src = layout(rand(2, 5, 4, 3), not to_channels_last)
    dst = torch.empty(2, 5, 4, 3, dtype=torch.float64,
                      memory_format=torch.channels_last if to_channels_last else torch.contiguous_format)
    got = scale_channels_host(src, None, dst, kernels)
    assert torch.equal(got, src) and got.stride() == dst.stride()


# ---------------------------------------------------------------- bias_act.cu


def bias_act_run(x, bias, slope, gain, clamp, dim, grad, kernels=None):
    """run<kGrad>() and bias_act_kernel, kGrad = grad is not None: the bias entry of memory
    offset i is (i / stride(dim)) % size(dim)."""
    x = _cuda._walkable(x)
    if grad is not None and grad.stride() != x.stride():
        grad = torch.empty_like(x).copy_(grad)
    out = Output(torch.empty_like(x))
    channel_stride = x.stride(dim) if x.shape[dim] > 1 else 1
    bias = None if bias is None else bias.detach().to(x.dtype).numpy()
    grad = None if grad is None else flat(grad)
    (kernels or TRANSCRIBED).bias_act(flat(x), bias, grad, out, channel_stride, x.shape[dim], slope, gain, clamp)
    return out.result()


def bias_act_kernel(x, bias, grad, out, channel_stride, channels, slope, gain, clamp):
    i = np.arange(x.size)
    z = x if bias is None else x + bias[(i // channel_stride) % channels]
    y = np.where(z > 0, z, z * slope) * gain
    if grad is None:
        out.write(i, y if clamp is None else np.where(y > clamp, clamp, np.where(y < -clamp, -clamp, y)))
    else:
        passes = np.ones(y.shape, dtype=bool) if clamp is None else (-clamp <= y) & (y <= clamp)
        g = grad * gain
        out.write(i, np.where(passes, np.where(z > 0, g, g * slope), 0.0))


TRANSCRIBED = types.SimpleNamespace(upfirdn2d_tiled=upfirdn2d_tiled_kernel, upfirdn2d_generic=upfirdn2d_generic_kernel,
                                    demod=demod_kernel, scale_channels=scale_channels_kernel,
                                    bias_act=bias_act_kernel)


def bias_act_host(x, bias, slope, gain, clamp, dim):
    return bias_act_run(x, bias, slope, gain, clamp, dim, None)


def bias_act_grad_host(grad, x, bias, slope, gain, clamp, dim):
    return bias_act_run(x, bias, slope, gain, clamp, dim, grad)


@pytest.mark.parametrize("shape,dim,memory_format", [
    ((3, 5, 6, 7), 1, torch.contiguous_format), ((3, 5, 6, 7), 1, torch.channels_last),
    ((3, 5, 6, 7), 3, torch.channels_last), ((3, 5, 1, 1), 1, torch.channels_last), ((33, 7), 1, None),
    ((4, 1, 5), 1, None), ((6, 5), 0, "transposed")])
def test_bias_act_kernel_matches_ref(kernels, shape, dim, memory_format):
    x = rand(*shape)
    if memory_format == "transposed":  # dense but in neither layout: the kernel walks a copy
        x = rand(*shape[::-1]).t()
    elif memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    bias = rand(shape[dim], seed=1)
    for slope, act, clamp in [(0.2, "lrelu", None), (0.0, "relu", 0.7), (1.0, "linear", 0.5)]:
        want = bias_act_ref(x, bias, act, slope, math.sqrt(2), clamp, dim)
        got = bias_act_run(x.detach(), bias, slope, math.sqrt(2), clamp, dim, None, kernels)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        upstream = rand(*shape, seed=2)
        want_grad, = torch.autograd.grad(want, x, upstream)
        got_grad = bias_act_run(x.detach(), bias, slope, math.sqrt(2), clamp, dim, upstream, kernels)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the Python glue of _cuda.py


@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
def test_cuda_backend_resampling_paths_match_ref(monkeypatch, up, down):
    """_cuda.modulated_conv2d's composition (transposed conv + blur, blur + strided conv) on the
    transcribed kernels equals the official ref."""
    monkeypatch.setattr(_cuda, "_ops", types.SimpleNamespace(upfirdn2d=upfirdn2d_host, modulated_conv2d=modconv_host))
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
def autograd_ops(monkeypatch):
    """torch.ops.mmfs_fast as _cuda.py sees it, with the transcribed kernels as forwards (but
    modulated_conv2d's, whose float32 weights would blur numerical derivatives)."""
    ops = types.SimpleNamespace(
        upfirdn2d=autograd_op(upfirdn2d_host, _cuda._upfirdn2d_setup, _cuda._upfirdn2d_backward),
        bias_act=autograd_op(bias_act_host, _cuda._bias_act_setup, _cuda._bias_act_backward),
        bias_act_grad=autograd_op(bias_act_grad_host, _cuda._bias_act_grad_setup, _cuda._bias_act_grad_backward),
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


def test_fake_kernels_agree_with_the_emulated_outputs():
    x = rand(2, 3, 9, 7).contiguous(memory_format=torch.channels_last)
    for pad, up, down in [((2, 1, 2, 1), 2, 1), ((-1, 2, 3, -2), 1, 2), ((2, -1, 0, 3), 3, 2)]:
        kernel = rand(4, 3, seed=1)
        fake = _cuda._upfirdn2d_fake(x, kernel, up, down, pad)
        got = upfirdn2d_host(x, kernel, up, down, pad)
        assert fake.shape == got.shape and fake.stride() == got.stride()
    weight, styles = rand(4, 3, 3, 3), rand(2, 3)
    for transposed, stride, padding in [(False, 1, 1), (True, 2, 0), (False, 2, 0)]:
        fake = _cuda._modulated_conv2d_fake(x, weight, styles, True, transposed, stride, padding)
        got = modconv_host(x, weight, styles, True, transposed, stride, padding)
        assert fake.shape == got.shape and fake.stride() == got.stride()
