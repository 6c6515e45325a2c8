"""Vendor peak throughput per GPU, the one place the benchmarks read it from.

Dense (no sparsity) tensor-core TFLOP/s per dtype and HBM bandwidth in GB/s, from
the NVIDIA data sheets. "fp32" is the TF32 tensor-core peak, because PyTorch lets
cuDNN run fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32).
Entries are matched by substring of torch.cuda.get_device_name(), first match wins,
so the more specific names come first.
"""
from __future__ import annotations

from typing import NamedTuple


class Peak(NamedTuple):
    tflops: dict[str, float]  # dtype name -> dense TFLOP/s
    gbps: float  # memory bandwidth, GB/s


def _peak(tf32: float, half: float, gbps: float) -> Peak:
    return Peak({"fp32": tf32, "fp16": half, "bf16": half}, gbps)


PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H200", _peak(494.7, 989.4, 4800)),
    ("H100 PCIe", _peak(378.0, 756.0, 2000)),
    ("H100 NVL", _peak(417.5, 835.0, 3900)),
    ("H100", _peak(494.7, 989.4, 3350)),  # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", _peak(156.0, 312.0, 2039)),
    ("A100-SXM4-40GB", _peak(156.0, 312.0, 1555)),
    ("A100 80GB PCIe", _peak(156.0, 312.0, 1935)),
    ("A100", _peak(156.0, 312.0, 1555)),
    ("L40S", _peak(183.0, 362.0, 864)),
    ("L4", _peak(60.0, 121.0, 300)),
    ("A10G", _peak(35.0, 70.0, 600)),
    ("RTX 4090", _peak(82.6, 165.2, 1008)),
    ("V100", Peak({"fp32": 15.7, "fp16": 125.0, "bf16": 0.0}, 900)),  # no TF32, no bf16 tensor cores
)


def peak_for(device_name: str) -> Peak | None:
    """The peak of the named GPU, or None when it is not in the table (or on the CPU)."""
    return next((peak for key, peak in PEAKS if key in device_name), None)


def fraction_of_peak(device_name: str, dtype: str, *, tflops: float | None = None,
                     gbps: float | None = None) -> float | None:
    """Achieved TFLOP/s (compute-bound ops) or GB/s (memory-bound ops) over the GPU's peak."""
    peak = peak_for(device_name)
    if peak is None:
        return None
    if tflops is not None:
        top = peak.tflops.get(dtype, 0.0)
        return tflops / top if top else None
    return gbps / peak.gbps if gbps is not None else None
