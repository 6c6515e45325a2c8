"""Autotuning config lists shared by the kernels."""
import os

import triton

_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def autotune_configs(full, interpreted):
    """``full`` on a GPU; only ``interpreted`` under TRITON_INTERPRET=1, where the
    autotuner would otherwise time every config on the (slow) CPU interpreter.

    Each config is a dict of constexpr values plus optional num_warps / num_stages.
    """
    chosen = [interpreted] if os.environ.get("TRITON_INTERPRET") == "1" else full
    return [triton.Config({k: v for k, v in c.items() if k not in _LAUNCH_OPTIONS},
                          **{k: v for k, v in c.items() if k in _LAUNCH_OPTIONS})
            for c in chosen]
