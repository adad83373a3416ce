"""The C allocator, set for training on the CPU: freed blocks are kept for the next step, whatever their size.

glibc's malloc serves large blocks (from 128 KB, its threshold rising as they are freed) with fresh pages
from the kernel and returns them when freed, so every step's activations page-fault again (docs/benchmarks.md,
Training, has what that costs). With the heap's trimming and top pad raised and no block served by mmap (the
threshold can rise to 32 MB at most, and a 65,536-token layer's tensors are larger), the second step onwards
reuses the first step's pages. Threads other than the main one still get blocks over their arena's 64 MB from
mmap."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
# in this order: where a glibc refused M_MMAP_MAX, the 32 MB threshold set before it would still hold
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20), (M_MMAP_MAX, 0))


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module notes); False where the C library
    is not glibc (no mallopt: nothing changes) or refuses a setting (the settings before it stay set)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
