"""Freed tensors go back to the system, so a long diff's memory follows what it holds.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which blocks of that
size come from the heap and stay with the process when freed. A diff allocates and frees tensors of every
size from three threads at once, so its resident memory then grows with the longest prompt's tensors
times the fragments left behind (270 MB to 690 MB from 1024 to 2048 tokens on the tiny model, 270 MB to
300 MB with the threshold fixed). Fixing it at 1 MiB keeps every block past that size mapped on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 1 << 20


def return_large_frees() -> None:
    """Fix glibc's mmap threshold (a no-op on other C libraries)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, THRESHOLD)
