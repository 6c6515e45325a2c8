"""CPU memory tuning for the Engine."""
from __future__ import annotations

import ctypes
import functools
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_cpu_memory() -> bool:
    """Keep freed CPU memory in the process heap for reuse, as PyTorch's caching allocator does
    on a GPU. Process-wide and lasting; glibc (Linux) only: elsewhere it does nothing and
    returns False.

    glibc hands out every block over 32 MiB (a 512² activation: 64 channels × 4 bytes is 64
    MiB) as fresh pages from mmap and unmaps it on free, so the kernel zero-fills it again on
    the next call (system time, a large share of a 512² CPU run). With the thresholds raised,
    freed blocks stay in the heap; one arena for all threads lets the submit() worker reuse
    them too (threads' own arenas are too small for such blocks).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all([mallopt(_M_MMAP_THRESHOLD, 1 << 30), mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1),
                mallopt(_M_ARENA_MAX, 1)])
