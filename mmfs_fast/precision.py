"""The precisions mmfs_fast renders in: their names, dtypes and the devices that offer them."""
from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


def precision_name(precision: str | torch.dtype) -> str:
    """The canonical name ("fp32", "fp16", "bf16") of a name, an alias or a dtype."""
    name = NAMES.get(precision) if isinstance(precision, torch.dtype) else ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"unsupported dtype {precision!r}; choose from {', '.join([*PRECISIONS, *ALIASES])}")
    return name


def default_precision(device: torch.device | str) -> str:
    """fp16 on CUDA, fp32 elsewhere."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def check_supported(name: str, device: torch.device | str) -> None:
    """fp16 is offered on CUDA only (the CPU lacks fast fp16 convolutions); fp32 and bf16 everywhere."""
    if name == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
