"""The index math of csrc/ checked on the CPU, without a GPU, on the compiled sources.

The kernels' own source, cut out of the .cu files, and the host-side index math the .cu files
call (csrc/index_math.h and csrc/*_index.h: output sizes, argument checks, layout rules, kernel
choice, grids, kernel parameters) are built for the CPU with tests/cuda_host_harness.cpp (g++;
kernels that share memory run on real threads meeting at __syncthreads) and compared with the
ref ops, with torch's layout predicates and with the grids that CUDA's limits dictate.

What stays in Python is the glue of each host function that allocates tensors: it calls the
harness in the order the .cu does (output size, layout, kernels). The backward formulas of mmfs_fast/ops/_cuda.py
are checked with gradcheck/gradgradcheck around the compiled kernels.
"""
import ctypes
import math
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

from mmfs_fast.ops import _cuda
from mmfs_fast.ops.bias_act import bias_act_ref
from mmfs_fast.ops.styled_epilogue import styled_epilogue, styled_epilogue_ref
from mmfs_fast.ops.upfirdn2d import upfirdn2d_ref

THREADS = 256  # csrc/index_math.h's kThreads
CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Where each file's kernels begin and end: the device code between them is compiled with the
# harness; the host code after them is not (it allocates tensors and launches with <<<>>>).
KERNEL_SPANS = {
    "upfirdn2d.cu": ("namespace {\n", "template <typename scalar_t>\nvoid launch("),
    "bias_act.cu": ("namespace {\n", "// x itself when the kernel"),
    "styled_epilogue.cu": ("namespace {\n", "// The host function's optional inputs."),
}


def build_harness(workdir: Path) -> ctypes.CDLL:
    spans = []
    for name, (begin, end) in KERNEL_SPANS.items():
        source = (CSRC / name).read_text()
        assert begin in source and end in source, f"csrc/{name} changed: update KERNEL_SPANS"
        start = source.index(begin) + len(begin)
        spans.append(f"namespace {{\n{source[start:source.index(end)]}\n}}  // namespace\n")
    (workdir / "kernels.inc").write_text("".join(spans))
    harness = Path(__file__).with_name("cuda_host_harness.cpp")
    library = workdir / "kernels.so"
    torch_include = Path(torch.__file__).parent / "include"  # the header-only part of torch's headers
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", f"-I{workdir}", f"-I{CSRC}", f"-I{torch_include}", str(harness),
                    "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


I64P, VOID, ERROR_SIZE = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, 2048
SIGNATURES = {  # name: (argument types, result type)
    "output_is_channels_last": ([I64P, I64P, ctypes.c_int64], ctypes.c_bool),
    "walks_in_memory_order": ([I64P, I64P, ctypes.c_int64], ctypes.c_bool),
    "same_strides": ([I64P, I64P, ctypes.c_int64], ctypes.c_bool),
    "upfirdn2d_output_size": ([I64P, ctypes.c_int64, I64P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, I64P,
                               ctypes.c_int64, I64P, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
    "upfirdn2d_plan": ([I64P, I64P, I64P, I64P, I64P, ctypes.c_int64, ctypes.c_int64, I64P,
                        ctypes.POINTER(ctypes.c_uint)], None),
    "upfirdn2d": ([VOID, VOID, VOID, I64P, I64P, I64P, I64P, I64P, ctypes.c_int64, ctypes.c_int64, I64P,
                   ctypes.c_uint], None),
    "bias_act": ([VOID, VOID, VOID, VOID, I64P, I64P, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                  ctypes.c_double, ctypes.c_double, ctypes.c_bool, ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t],
                 ctypes.c_int),
    "styled_epilogue_output_size": ([I64P, ctypes.c_int64] * 6 + [ctypes.c_int64, I64P, ctypes.c_char_p,
                                                                  ctypes.c_size_t], ctypes.c_int),
    "styled_epilogue_check_unscaled_out": ([ctypes.c_bool, I64P, I64P, ctypes.c_int64, I64P, ctypes.c_bool,
                                            ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
    "styled_epilogue": ([VOID] * 8 + [I64P, I64P, I64P, ctypes.c_int64, I64P, ctypes.c_int64, ctypes.c_double,
                                      ctypes.c_double, ctypes.c_uint], None),
}


def ints(values):
    values = [int(v) for v in values]
    return (ctypes.c_int64 * max(len(values), 1))(*values)


def data(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def nans(shape, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full(shape, math.nan, dtype=torch.float64).contiguous(memory_format=memory_format)


def unwritten(out):
    """The NaN an output buffer starts as marks what the kernel did not write."""
    assert not out.isnan().any(), "some outputs were never written"
    return out


class Harness:
    """tests/cuda_host_harness.cpp: the compiled kernels and index math of csrc/."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        for name, (argtypes, restype) in SIGNATURES.items():
            getattr(library, name).argtypes, getattr(library, name).restype = argtypes, restype

    def _checked(self, function, *args):
        """Calls a harness function whose last two arguments report a failed check."""
        error = ctypes.create_string_buffer(ERROR_SIZE)
        if function(*args, error, ERROR_SIZE):
            raise RuntimeError(error.value.decode())

    def output_is_channels_last(self, t):
        return self.library.output_is_channels_last(ints(t.shape), ints(t.stride()), t.dim())

    def walks_in_memory_order(self, t):
        return self.library.walks_in_memory_order(ints(t.shape), ints(t.stride()), t.dim())

    def same_strides(self, a, b):
        return a.dim() == b.dim() and self.library.same_strides(ints(a.stride()), ints(b.stride()), a.dim())

    def empty_with_layout_of(self, x, shape):
        """common.h's empty_with_layout_of, filled with NaN."""
        return nans(shape, self.output_is_channels_last(x))

    # upfirdn2d.cu

    def upfirdn2d_output_size(self, x_shape, kernel_shape, up, down, pad):
        out_hw = ints([0, 0])
        self._checked(self.library.upfirdn2d_output_size, ints(x_shape), len(x_shape), ints(kernel_shape),
                      len(kernel_shape), up, down, ints(pad), len(pad), out_hw)
        return tuple(out_hw)

    def upfirdn2d_plan(self, x, out_shape, kernel_shape, up, down, pad):
        """(tiled, grid) for x and an output of its layout."""
        out = torch.empty(out_shape, device="meta").contiguous(
            memory_format=torch.channels_last if self.output_is_channels_last(x) else torch.contiguous_format)
        plan = (ctypes.c_uint * 4)()
        self.library.upfirdn2d_plan(ints(x.shape), ints(x.stride()), ints(out.shape), ints(out.stride()),
                                    ints(kernel_shape), up, down, ints(pad), plan)
        return bool(plan[0]), tuple(plan[1:])

    def upfirdn2d(self, x, kernel, up, down, pad, max_grid_z=0):
        """upfirdn2d(): the output size and checks, the output's layout, launch()'s kernel on its grid."""
        out_h, out_w = self.upfirdn2d_output_size(x.shape, kernel.shape, up, down, pad)
        out = self.empty_with_layout_of(x, (x.shape[0], x.shape[1], out_h, out_w))
        if out.numel() == 0:
            return out
        x = x.detach()
        taps = kernel.detach().float().contiguous()
        self.library.upfirdn2d(data(x), data(taps), data(out), ints(x.shape), ints(x.stride()), ints(out.shape),
                               ints(out.stride()), ints(kernel.shape), up, down, ints(pad), max_grid_z)
        return unwritten(out)

    # bias_act.cu

    def bias_act(self, x, bias, slope, gain, clamp, dim, grad=None, max_blocks=2):
        """run<kGrad>(), kGrad = grad is not None: x walked in place or copied, grad in x's strides,
        the checks, the parameters and the kernel. max_blocks: a grid that the grid-stride loop
        walks in several rounds, as on large tensors."""
        x = x.detach()
        if not self.walks_in_memory_order(x):
            x = x.contiguous()
        if grad is not None:
            grad = grad.detach()
            if not self.same_strides(grad, x):
                grad = torch.empty_like(x).copy_(grad)
        out = torch.full_like(x, math.nan)  # empty_like: x's strides
        bias = None if bias is None else bias.detach().to(x.dtype).contiguous()
        self._checked(self.library.bias_act, data(x), data(bias), data(grad), data(out), ints(x.shape),
                      ints(x.stride()), x.dim(), dim, slope, gain, clamp or 0.0, clamp is not None, max_blocks)
        return unwritten(out)

    def bias_act_forward(self, x, bias, slope, gain, clamp, dim):
        return self.bias_act(x, bias, slope, gain, clamp, dim)

    def bias_act_grad(self, grad, x, bias, slope, gain, clamp, dim):
        return self.bias_act(x, bias, slope, gain, clamp, dim, grad)

    # styled_epilogue.cu

    def styled_epilogue(self, x, demod, bias, noise, noise_strength, slope, next_styles=None, blur=None, blur_pad=0,
                        unscaled_out=None, max_blocks=2):
        """styled_epilogue(): the checks and output size, x walked in place or copied, the output in
        its layout and the checks of unscaled_out against it, demod, bias, next_styles and the taps
        as contiguous float32, noise contiguous in x's dtype, the parameters and the kernel.
        max_blocks: see bias_act."""
        def shape(t):
            return (None, 0) if t is None else (ints(t.shape), t.dim())

        out_hw = ints([0, 0])
        self._checked(self.library.styled_epilogue_output_size, *shape(x), *shape(demod), *shape(bias), *shape(noise),
                      *shape(next_styles), *shape(blur), blur_pad, out_hw)
        x = x if self.walks_in_memory_order(x) else x.contiguous()
        out = self.empty_with_layout_of(x, (*x.shape[:2], *out_hw))
        if unscaled_out is not None:
            self._checked(self.library.styled_epilogue_check_unscaled_out, next_styles is not None,
                          ints(unscaled_out.shape), ints(unscaled_out.stride()), unscaled_out.dim(), ints(out.shape),
                          self.output_is_channels_last(x))
        demod32, bias32 = demod.float().contiguous(), bias.float().contiguous()
        next32, taps = [None if t is None else t.float().contiguous() for t in (next_styles, blur)]
        noise = None if noise is None else noise.to(x.dtype).contiguous()
        self.library.styled_epilogue(data(x), data(demod32), data(bias32), data(noise), data(next32), data(taps),
                                     data(out), data(unscaled_out), ints(x.shape), ints(x.stride()), out_hw,
                                     0 if noise is None else noise.shape[0], shape(blur)[0], blur_pad,
                                     noise_strength, slope, max_blocks)
        return unwritten(out)



@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return Harness(build_harness(tmp_path_factory.mktemp("cuda_host_harness")))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------- layout rules (index_math.h)


def layout_cases():
    x = rand(2, 3, 4, 5)
    return {
        "nchw": x, "nhwc": layout(x, True), "nhwc_1x1": layout(rand(2, 3, 1, 1), True),
        "nhwc_one_channel": layout(rand(2, 1, 4, 5), True), "nhwc_batch_1": layout(rand(1, 3, 4, 5), True),
        "nhwc_one_row": layout(rand(2, 3, 1, 5), True), "transposed_hw": x.transpose(2, 3),
        "strided": x[:, :, ::2], "nhwc_strided": layout(x, True)[:, :, :, ::2],
        "nhwc_empty": layout(rand(0, 3, 4, 5), True),
        "chwn": x.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0), "3d": rand(4, 5, 6),
        "3d_transposed": rand(4, 5, 6).transpose(0, 2), "1d": rand(7), "2d_transposed": rand(6, 5).t(),
        # a size-1 dim's stride is arbitrary: torch ignores it in both layouts
        "nchw_odd_stride_1": torch.empty_strided((2, 3, 1, 5), (15, 5, 99, 1)),
        "nhwc_odd_stride_1": torch.empty_strided((2, 3, 1, 5), (15, 1, 99, 3)),
    }


@pytest.mark.parametrize("name", list(layout_cases()))
def test_layout_rules_match_torch(harness, name):
    """common.h's output layout and bias_act.cu's walk-in-place choice against torch's own
    is_contiguous, and against the fake kernels' rules in _cuda.py."""
    t = layout_cases()[name]
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    assert harness.output_is_channels_last(t) == (channels_last and not t.is_contiguous())
    assert harness.walks_in_memory_order(t) == (t.is_contiguous() or channels_last)
    if t.dim() == 4:
        expected = torch.empty(t.shape).contiguous(
            memory_format=torch.channels_last if harness.output_is_channels_last(t) else torch.contiguous_format)
        assert _cuda._empty_with_layout_of(t, t.shape).stride() == expected.stride()
    assert harness.walks_in_memory_order(t) == (_cuda._walkable(t) is t)


# ---------------------------------------------------------------- upfirdn2d.cu


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
def test_upfirdn2d_kernels_match_ref(harness, up, down, pad, kernel_shape, size, channels_last):
    x = layout(rand(2, 3, *size), channels_last)
    kernel = rand(*kernel_shape, seed=1).float().double()  # the kernels' taps are float32
    got = harness.upfirdn2d(x, kernel, up, down, pad)
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, up, down, pad), rtol=1e-12, atol=1e-12)
    # a (1, 1) image is contiguous in both layouts, and then the output is plainly contiguous
    expected_format = torch.channels_last if channels_last and size != (1, 1) else torch.contiguous_format
    assert got.is_contiguous(memory_format=expected_format)


def test_upfirdn2d_tiled_kernel_loops_over_more_planes_than_the_grid(harness):
    x, kernel = rand(1, 5, 6, 7), rand(4, 4, seed=1).float().double()
    assert harness.upfirdn2d_plan(x, (1, 5, 12, 14), (4, 4), 2, 1, (2, 1, 2, 1)) == (True, (1, 1, 5))
    got = harness.upfirdn2d(x, kernel, 2, 1, (2, 1, 2, 1), max_grid_z=2)  # 5 planes on 2 blocks, as past 65535
    torch.testing.assert_close(got, upfirdn2d_ref(x, kernel, 2, 1, (2, 1, 2, 1)), rtol=1e-12, atol=1e-12)


def blocks_for(work):
    """A grid-stride grid: one thread per item, at most 2^20 blocks."""
    return min(-(-work // THREADS), 1 << 20)


@pytest.mark.parametrize("x_shape,kernel_shape,up,down,pad,tiled,grid", [
    # 4x4 FIR at (up, down) = (2, 1): a 70x66 output is 3x3 tiles of 32, one grid layer per plane
    ((2, 3, 35, 33), (4, 4), 2, 1, (2, 1, 2, 1), True, (3, 3, 6)),
    ((1, 70000, 8, 8), (4, 4), 1, 1, (1, 1, 1, 1), True, (1, 1, 65535)),  # gridDim.z's limit: the planes loop
    ((1, 1, 2097121, 4), (4, 4), 1, 1, (1, 1, 1, 1), True, (1, 65535, 1)),  # 2097120 rows: gridDim.y's last tile
    ((1, 1, 2097122, 4), (4, 4), 1, 1, (1, 1, 1, 1), False, (blocks_for(2097121 * 3), 1, 1)),  # one tile past it
    ((2, 3, 10, 11), (4, 4), 2, 2, (1, 2, 0, 3), False, (blocks_for(6 * 10 * 11), 1, 1)),
    ((2, 3, 9, 7), (5, 3), 3, 2, (2, -1, 0, 3), False, (blocks_for(6 * 13 * 10), 1, 1)),
    ((1, 8192, 256, 256), (3, 3), 1, 1, (1, 1, 1, 1), False, (1 << 20, 1, 1)),  # the grid-stride cap
])
def test_upfirdn2d_launch_plan(harness, x_shape, kernel_shape, up, down, pad, tiled, grid):
    x = torch.empty(x_shape, device="meta")
    out_hw = harness.upfirdn2d_output_size(x_shape, kernel_shape, up, down, pad)
    assert harness.upfirdn2d_plan(x, (*x_shape[:2], *out_hw), kernel_shape, up, down, pad) == (tiled, grid)


@pytest.mark.parametrize("x_shape,kernel_shape,up,down,pad,message", [
    ((2, 3, 4, 4), (4, 4), 1, 1, (0, 0, 0, -1), "leaves an empty output"),
    ((2, 3, 4, 4), (4, 4), 1, 1, (-1, 0, 0, 0), "leaves an empty output"),
    ((2, 3, 4), (4, 4), 1, 1, (0, 0, 0, 0), "x must be (N, C, H, W), got [2, 3, 4]"),
    ((2, 3, 4, 4), (4,), 1, 1, (0, 0, 0, 0), "kernel must be 2-D, got [4]"),
    ((2, 3, 40, 40), (33, 4), 1, 1, (0, 0, 0, 0), "kernel must be between 1x1 and 32x32, got [33, 4]"),
    ((2, 3, 4, 4), (4, 4), 0, 1, (0, 0, 0, 0), "up and down must be in [1, 32], got up=0 down=1"),
    ((2, 3, 4, 4), (4, 4), 1, 33, (0, 0, 0, 0), "up and down must be in [1, 32], got up=1 down=33"),
    ((2, 3, 4, 4), (4, 4), 1, 1, (0, 0, 0), "pad must be (x0, x1, y0, y1), got [0, 0, 0]"),
    ((2, 3, 4, 4), (4, 4), 1, 1, (0, 0, 1 << 24, 0), "is out of range"),
    ((1, 1, 1 << 23, 4), (4, 4), 2, 1, (1, 1, 1, 1), "is too large"),
])
def test_upfirdn2d_checks_name_the_problem(harness, x_shape, kernel_shape, up, down, pad, message):
    with pytest.raises(RuntimeError, match="mmfs_fast::upfirdn2d: ") as error:
        harness.upfirdn2d_output_size(x_shape, kernel_shape, up, down, pad)
    assert message in str(error.value)


def test_upfirdn2d_output_size_at_the_edge_of_empty(harness):
    """One output row and column left: the emptiness check is not off by one."""
    assert harness.upfirdn2d_output_size((2, 3, 4, 4), (4, 4), 1, 1, (0, 0, 0, 0)) == (1, 1)
    assert harness.upfirdn2d_output_size((2, 3, 3, 4), (4, 4), 1, 1, (0, 0, 1, 0)) == (1, 1)
    assert harness.upfirdn2d_output_size((2, 3, 4, 4), (4, 4), 1, 3, (0, 2, 0, 2)) == (1, 1)


# ---------------------------------------------------------------- bias_act.cu


@pytest.mark.parametrize("shape,dim,memory_format", [
    ((3, 5, 6, 7), 1, torch.contiguous_format), ((3, 5, 6, 7), 1, torch.channels_last),
    ((3, 5, 6, 7), 3, torch.channels_last), ((3, 5, 1, 1), 1, torch.channels_last), ((33, 7), 1, None),
    ((4, 1, 5), 1, None), ((6, 5), 0, "transposed")])
def test_bias_act_kernel_matches_ref(harness, shape, dim, memory_format):
    x = rand(*shape)
    if memory_format == "transposed":  # dense but in neither layout: the kernel walks a copy
        x = rand(*shape[::-1]).t()
    elif memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    bias = rand(shape[dim], seed=1)
    upstream = rand(*shape, seed=2)  # contiguous: for a channels_last x, run() copies it into x's strides
    for slope, act, clamp in [(0.2, "lrelu", None), (0.0, "relu", 0.7), (1.0, "linear", 0.5)]:
        want = bias_act_ref(x, bias, act, slope, math.sqrt(2), clamp, dim)
        got = harness.bias_act(x, bias, slope, math.sqrt(2), clamp, dim)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        want_grad, = torch.autograd.grad(want, x, upstream)
        got_grad = harness.bias_act(x, bias, slope, math.sqrt(2), clamp, dim, upstream)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_bias_act_on_one_grid_block_per_item_range(harness):
    """The grid grid_stride_blocks sizes, uncapped: every element once, no grid-stride rounds."""
    x, bias = rand(3, 5, 6, 7), rand(5, seed=1)
    got = harness.bias_act(x, bias, 0.2, math.sqrt(2), None, 1, max_blocks=0)
    torch.testing.assert_close(got, bias_act_ref(x, bias, "lrelu", 0.2, math.sqrt(2), None, 1), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("shape,dim,clamp,message", [
    ((3, 4), 2, None, "dim 2 is out of range for a 2-D tensor"),
    ((3, 4), -1, None, "dim -1 is out of range for a 2-D tensor"),
    ((3, 4), 1, -0.5, "clamp must be >= 0, got -0.5"),
])
def test_bias_act_checks_name_the_problem(harness, shape, dim, clamp, message):
    with pytest.raises(RuntimeError, match="mmfs_fast::bias_act: ") as error:
        harness.bias_act(rand(*shape), None, 0.2, 1.0, clamp, dim)
    assert message in str(error.value)


# ---------------------------------------------------------------- styled_epilogue.cu


# (blur, blur_pad, next_styles): the decoder's FIR ×4 after a transposed convolution (2r + 1 → 2r
# with pad 1), and an asymmetric one with a wider pad, where a wrong flip, a transposed axis or a
# wrong border shows; taps that float32 holds exactly, as the kernel reads them
EPILOGUE_FORMS = {
    "plain": (None, 0, False),
    "next styles": (None, 0, True),
    "decoder blur": (torch.outer(*[torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)] * 2) / 16, 1, True),
    "asymmetric blur": (rand(3, 4, seed=5).float().double(), 2, False),
}


@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("noise_batch", [None, 1, 3])
@pytest.mark.parametrize("max_blocks", [0, 2])
@pytest.mark.parametrize("form", EPILOGUE_FORMS.values(), ids=EPILOGUE_FORMS.keys())
def test_styled_epilogue_kernel_matches_ref(harness, layout_name, noise_batch, max_blocks, form):
    blur, blur_pad, with_next = form
    x = rand(3, 5, 6, 7)
    if layout_name == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout_name == "transposed":  # dense but in neither layout: the kernel walks a copy
        x = rand(3, 5, 7, 6).transpose(2, 3)
    demod, bias = rand(3, 5, seed=1).float().double(), rand(5, seed=2).float().double()  # read as float32
    next_styles = rand(3, 5, seed=4).float().double() if with_next else None
    out_size = (6, 7) if blur is None else (6 + 2 * blur_pad - blur.shape[0] + 1, 7 + 2 * blur_pad - blur.shape[1] + 1)
    noise = None if noise_batch is None else rand(noise_batch, 1, *out_size, seed=3)
    # the output keeps x's layout (a copy's, for x in neither); so does the unscaled one, given with next_styles
    channels_last = layout_name == "channels_last"
    unscaled, want_unscaled = (nans((3, 5, *out_size), channels_last) for _ in range(2)) if with_next else (None, None)
    got = harness.styled_epilogue(x, demod, bias, noise, 0.7, 0.2, next_styles, blur, blur_pad, unscaled,
                                  max_blocks=max_blocks)
    want = styled_epilogue_ref(x, demod, bias, noise, 0.7, 0.2, next_styles, blur, blur_pad, want_unscaled)
    assert got.shape == (3, 5, *out_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if with_next:
        torch.testing.assert_close(unwritten(unscaled), want_unscaled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,message", [
    (dict(x=(2, 3, 4)), "x must be 4-D (B, C, H, W), got [2, 3, 4]"),
    (dict(demod=(3, 2)), "demod must have shape (2, 3), got [3, 2]"),
    (dict(bias=(2,)), "bias must have shape (3), got [2]"),
    (dict(noise=(3, 1, 4, 4)), "noise must have shape (1 or 2, 1, 4, 4), got [3, 1, 4, 4]"),
    (dict(noise=(1, 1, 4, 5)), "noise must have shape (1 or 2, 1, 4, 4), got [1, 1, 4, 5]"),
    (dict(next_styles=(2, 4)), "next_styles must have shape (2, 3), got [2, 4]"),
    (dict(next_styles=(6,)), "next_styles must have shape (2, 3), got [6]"),
    (dict(blur_pad=1), "blur_pad is given (1) without a blur"),
    (dict(blur=(16,), blur_pad=1), "blur must be a 2-D FIR (kh, kw), got [16]"),
    (dict(blur=(0, 3)), "blur must be a 2-D FIR (kh, kw), got [0, 3]"),
    (dict(blur=(3, 3), blur_pad=-1), "blur_pad must be in [0, 2^24), got -1"),
    (dict(blur=(6, 3)), "a [6, 3] blur with pad 0 leaves nothing of x's [4, 4]"),
    # with a blur the noise has the output's size, not x's
    (dict(blur=(4, 4), blur_pad=1, noise=(1, 1, 4, 4)), "noise must have shape (1 or 2, 1, 3, 3), got [1, 1, 4, 4]"),
])
def test_styled_epilogue_checks_name_the_problem(harness, bad, message):
    shapes = dict(x=(2, 3, 4, 4), demod=(2, 3), bias=(3,), noise=None, next_styles=None, blur=None, blur_pad=0) | bad
    blur_pad = shapes.pop("blur_pad")
    t = {name: None if shape is None else rand(*shape) for name, shape in shapes.items()}
    with pytest.raises(RuntimeError, match="mmfs_fast::styled_epilogue: ") as error:
        harness.styled_epilogue(t["x"], t["demod"], t["bias"], t["noise"], 0.5, 0.2, t["next_styles"], t["blur"],
                                blur_pad)
    assert message in str(error.value)


# x (2, 3, 4, 4) in the layout named, next_styles (2, 3) unless "next_styles" is False, blur,
# blur_pad and unscaled_out as given (a shape, dense in the layout named)
UNSCALED_OUT_CASES = {
    "without next_styles": (dict(next_styles=False), "unscaled_out is given without next_styles (it would equal "
                                                     "the result)"),
    "wrong shape": (dict(unscaled=((2, 3, 4, 5), "contiguous")),
                    "unscaled_out must have the result's shape [2, 3, 4, 4], got [2, 3, 4, 5]"),
    "x's shape with a blur": (dict(blur=(4, 4), blur_pad=1, unscaled=((2, 3, 4, 4), "contiguous")),
                              "unscaled_out must have the result's shape [2, 3, 3, 3], got [2, 3, 4, 4]"),
    "channels_last for contiguous x": (dict(unscaled=((2, 3, 4, 4), "channels_last")),
                                       "unscaled_out must be dense in the result's layout (contiguous), got strides "
                                       "[48, 1, 12, 3]"),
    "contiguous for channels_last x": (dict(x="channels_last", unscaled=((2, 3, 4, 4), "contiguous")),
                                       "unscaled_out must be dense in the result's layout (channels_last), got "
                                       "strides [48, 16, 4, 1]"),
    # x in neither layout is walked as a contiguous copy: the output, and so unscaled_out, is contiguous
    "channels_last for x in neither": (dict(x="transposed", unscaled=((2, 3, 4, 4), "channels_last")),
                                       "unscaled_out must be dense in the result's layout (contiguous)"),
    "strided": (dict(unscaled=((2, 3, 4, 4), "strided")), "unscaled_out must be dense in the result's layout "
                                                          "(contiguous), got strides [96, 32, 8, 2]"),
}


def epilogue_with_unscaled_out(x="contiguous", next_styles=True, blur=None, blur_pad=0,
                               unscaled=((2, 3, 4, 4), "contiguous"), channels=3):
    """Arguments of styled_epilogue (positional, the ref's order) for the cases above; demod, bias,
    next_styles and the taps hold float32 values, as the kernel reads them."""
    def laid_out(shape, layout):
        if layout == "transposed":
            return rand(*shape[:2], shape[3], shape[2]).transpose(2, 3)
        if layout == "strided":
            return rand(*shape[:3], 2 * shape[3])[..., ::2]
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        return rand(*shape).contiguous(memory_format=memory_format)

    def float32(*shape, seed):
        return rand(*shape, seed=seed).float().double()

    return (laid_out((2, channels, 4, 4), x), float32(2, channels, seed=1), float32(channels, seed=2), None, 0.5, 0.2,
            float32(2, channels, seed=4) if next_styles else None, None if blur is None else float32(*blur, seed=5),
            blur_pad, laid_out(*unscaled))


@pytest.mark.parametrize("case", UNSCALED_OUT_CASES.values(), ids=UNSCALED_OUT_CASES.keys())
def test_styled_epilogue_unscaled_out_checks_name_the_problem(harness, case):
    bad, message = case
    args = epilogue_with_unscaled_out(**bad)
    with pytest.raises(RuntimeError, match="mmfs_fast::styled_epilogue: ") as error:
        harness.styled_epilogue(*args)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="styled_epilogue: unscaled_out"):  # the public op's check agrees
        styled_epilogue(*args[:4], args[4], *args[6:])


# one channel makes a tensor dense in both layouts: the channel stride is free, in torch's rule and the check's
@pytest.mark.parametrize("x,unscaled,channels", [
    ("channels_last", "contiguous", 1), ("contiguous", "channels_last", 1), ("channels_last", "channels_last", 3),
    ("transposed", "contiguous", 3)])
def test_styled_epilogue_unscaled_out_dense_in_the_result_layout_is_written(harness, x, unscaled, channels):
    args = epilogue_with_unscaled_out(x=x, unscaled=((2, channels, 4, 4), unscaled), channels=channels)
    unscaled_out = args[-1].fill_(math.nan)
    want_unscaled = unscaled_out.clone()
    got = harness.styled_epilogue(*args)
    want = styled_epilogue_ref(*args[:-1], want_unscaled)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unwritten(unscaled_out), want_unscaled, rtol=1e-12, atol=1e-12)
    styled_epilogue(*args[:4], args[4], *args[6:])  # the public op's check accepts it too


# ---------------------------------------------------------------- the Python glue of _cuda.py


def autograd_op(forward, setup_context, backward):
    """An op with the given forward and _cuda.py's setup_context and backward, as
    torch.library.register_autograd wires them around the CUDA kernel."""
    return type(forward.__name__, (torch.autograd.Function,), dict(
        forward=staticmethod(lambda *args: forward(*args)),  # inputs as called, without forward's defaults
        setup_context=staticmethod(setup_context),
        backward=staticmethod(backward))).apply


@pytest.fixture
def autograd_ops(harness, monkeypatch):
    """torch.ops.mmfs_fast as _cuda.py sees it, with the compiled kernels as forwards."""
    ops = types.SimpleNamespace(
        upfirdn2d=autograd_op(harness.upfirdn2d, _cuda._upfirdn2d_setup, _cuda._upfirdn2d_backward),
        bias_act=autograd_op(harness.bias_act_forward, _cuda._bias_act_setup, _cuda._bias_act_backward),
        bias_act_grad=autograd_op(harness.bias_act_grad, _cuda._bias_act_grad_setup, _cuda._bias_act_grad_backward))
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


def test_fake_kernels_agree_with_the_compiled_host_code(harness):
    """The fake kernels of _cuda.py (shapes and strides for torch.compile) against the output
    sizes and layouts that the compiled host code gives."""
    for x in (rand(2, 3, 9, 7).contiguous(memory_format=torch.channels_last), rand(2, 3, 9, 7),
              rand(2, 1, 9, 7).contiguous(memory_format=torch.channels_last)):  # the last: both layouts at once
        for pad, up, down in [((2, 1, 2, 1), 2, 1), ((-1, 2, 3, -2), 1, 2), ((2, -1, 0, 3), 3, 2)]:
            kernel = rand(4, 3, seed=1)
            fake = _cuda._upfirdn2d_fake(x, kernel, up, down, pad)
            got = harness.upfirdn2d(x, kernel, up, down, pad)
            assert fake.shape == got.shape and fake.stride() == got.stride()
        for dim in (1, 3):
            fake = _cuda._bias_act_fake(x, None, 0.2, 1.0, None, dim)
            got = harness.bias_act(x, None, 0.2, 1.0, None, dim)
            assert fake.shape == got.shape and fake.stride() == got.stride()
    for x in (rand(2, 3, 9, 7).contiguous(memory_format=torch.channels_last), rand(2, 3, 9, 7),
              rand(2, 1, 9, 7).contiguous(memory_format=torch.channels_last), rand(2, 3, 7, 9).transpose(2, 3)):
        demod, bias = rand(*x.shape[:2]), rand(x.shape[1])
        for blur, blur_pad in [(None, 0), (rand(4, 4), 1), (rand(3, 4), 2)]:
            next_styles = rand(*x.shape[:2], seed=4)
            fake = _cuda._styled_epilogue_fake(x, demod, bias, None, 0.5, 0.2, next_styles, blur, blur_pad, None)
            got = harness.styled_epilogue(x, demod, bias, None, 0.5, 0.2, next_styles, blur, blur_pad)
            assert fake.shape == got.shape and fake.stride() == got.stride()
            # a buffer of the fake output's shape and strides is the unscaled_out the host code accepts
            unscaled = torch.empty_strided(fake.shape, fake.stride(), dtype=x.dtype)
            harness.styled_epilogue(x, demod, bias, None, 0.5, 0.2, next_styles, blur, blur_pad, unscaled)
