"""How a diff's allocations reach the system: freed prefill tensors go back, decode steps reuse memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
PREFILL_THRESHOLD = 1 << 20
#: glibc's own ceiling for the threshold (HEAP_MAX_SIZE / 2 on 64-bit); the trim threshold twice that, as
#: glibc sets it itself when it raises the threshold
DECODE_THRESHOLD = 32 << 20


# glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which blocks of that size
# come from the heap and stay with the process when freed. A diff's prefill allocates and frees tensors of every
# size from three threads at once, so its resident memory then grows with the longest prompt's tensors times the
# fragments left behind (270 MB to 690 MB from 1024 to 2048 tokens on the tiny model, 270 MB to 300 MB with the
# threshold fixed at 1 MiB): through the prefill every block past 1 MiB is mapped on its own. Decode steps are the
# opposite: each allocates the same few MB-sized blocks again (HF's cache grows by concatenation, 4.7 MB a layer
# at 2304 tokens of the 0.6B shape), which, mapped anew each time, cost a page fault per 4 KB (tens of GB zeroed
# over 256 steps); from the first decode step on, such blocks stay with the heap for reuse.
#
# But a cache grown by concatenation never fits the hole its last copy left (each copy is a slot longer), so the
# heap keeps the holes: HF alone at 2048 + 48 on the 0.6B shape held 1.7 GB of heap for a 235 MB cache. `trim`
# after each decode step hands the holes' pages back (0.45 GB there, in no more time). A capture, which keeps
# glibc's own thresholds, trims after each step too: HF at 2048 + 256 keeping its logits peaked at 2.4-3.7 GB
# without, 1.3 GB with.
@functools.cache  # found once: find_library runs ldconfig, and `trim` is called every step
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _libc_fn(name: str, *argtypes):
    if (fn := getattr(_libc(), name, None)) is not None:
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _mallopt():
    return _libc_fn("mallopt", ctypes.c_int, ctypes.c_int)


def for_prefill() -> None:
    """Every block past 1 MiB mapped on its own (a no-op on other C libraries)."""
    if (mallopt := _mallopt()) is not None:
        mallopt(M_MMAP_THRESHOLD, PREFILL_THRESHOLD)


def for_decode() -> None:
    """Blocks up to 32 MB reused from the heap, which is trimmed only past 64 MB free at its top."""
    if (mallopt := _mallopt()) is not None:
        mallopt(M_MMAP_THRESHOLD, DECODE_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, 2 * DECODE_THRESHOLD)


def trim() -> None:
    """Hand the free pages inside every heap back to the system (a no-op on other C libraries)."""
    if (malloc_trim := _libc_fn("malloc_trim", ctypes.c_size_t)) is not None:
        malloc_trim(0)
