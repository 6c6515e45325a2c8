"""Build and install mmfs_fast.

The CUDA extension ``mmfs_fast._C`` (csrc/) is compiled here, ahead of time, when
torch is a CUDA build and nvcc is found (or MMFS_FAST_FORCE_CUDA=1); otherwise the
package installs without it (Triton + ref backends) and says so in one line.
Install with ``pip install --no-build-isolation .`` so that it builds against the
torch already installed.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;9.0+PTX"


def _nvidia_include_dirs():
    """Headers that pip's nvidia-* packages ship (CUDA 13 wheels put them under nvidia/cu13/include)."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources or os.environ.get("MMFS_FAST_NO_CUDA") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    force = os.environ.get("MMFS_FAST_FORCE_CUDA") == "1"
    if not force and (torch.version.cuda is None or CUDA_HOME is None):
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"mmfs_fast: building without the CUDA extension because {why}; "
              "the triton and ref backends remain.", file=sys.stderr)
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected GPU")
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    cxx_flags = ["-O3", "-std=c++17"]
    build_info = f'-DMMFS_FAST_BUILD_INFO="arch={arch_list};nvcc={" ".join(nvcc_flags)}"'
    extension = CUDAExtension(
        name="mmfs_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + [build_info], "nvcc": nvcc_flags + [build_info]},
    )
    print(f"mmfs_fast: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list}", file=sys.stderr)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="mmfs_fast",
    version="0.1.0",
    description="Fast PyTorch engine for MMFS face stylization (CUDA + Triton kernels, fp16, CUDA graphs)",
    python_requires=">=3.10",
    packages=["mmfs_fast", "mmfs_fast.ops", "mmfs_fast.models", "mmfs_fast.encoders", "mmfs_fast.train",
              "mmfs_fast.kernels"],
    package_dir={"mmfs_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        "clip": ["open_clip_torch", "timm"],
        "triton": ["triton"],
        # face detection/landmarks (dlib + its offline 68-point model) and video I/O
        "faces": ["dlib-bin", "face-recognition-models", "av"],
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["mmfs-fast=mmfs_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
