"""Per-tensor value statistics (min/max/mean/std/zeros/non-finite) in one fused pass of a C kernel (stats.c) over
the raw bytes."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3dbg.util.cbuild import REDUCTION_FLAGS, build

DTYPE_CODES = {"float64": 0, "float32": 1, "bfloat16": 2, "float16": 3}


class _Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("n_finite", "n_nan", "n_posinf", "n_neginf", "n_zero")] + [
        (n, ctypes.c_double) for n in ("sum", "sumsq", "min", "max")
    ]


_lib = None


# Separate torch reductions on bf16 run about 8x slower than reading the bytes, hence the kernel, built with the
# system C compiler on first use and cached. Large bf16/f16 windows are counted into a 65536-bin histogram, from
# which every statistic follows exactly; everything else is swept once, 16-bit values widened in registers (never
# copied to fp32), in fixed chunks folded in order. Neither depends on the thread count.
def _kernel():
    """The compiled kernel, built on first use into the cache (keyed by source and flags)."""
    global _lib
    if _lib is None:
        lib = build("scan_stats", Path(__file__).with_name("stats.c"), REDUCTION_FLAGS, "the scan's statistics kernel")
        lib.stats_update.argtypes = [
            ctypes.POINTER(_Stats),
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_double,
        ]
        lib.stats_update.restype = ctypes.c_int
        lib.stats_chunk.restype = ctypes.c_int64
        lib.stats_hist_min.restype = ctypes.c_int64
        _lib = lib
    return _lib


@dataclass(frozen=True)
class Stats:
    """Statistics of one tensor; min/max/mean/std are over its finite values (std: population)."""

    numel: int
    n_nan: int
    n_posinf: int
    n_neginf: int
    n_zero: int
    min: float
    max: float
    mean: float
    std: float

    @property
    def nonfinite(self) -> int:
        return self.n_nan + self.n_posinf + self.n_neginf

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.numel > self.nonfinite else float("nan")

    def to_dict(self) -> dict:
        return {
            "numel": self.numel,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "absmax": self.absmax,
            "n_nan": self.n_nan,
            "n_posinf": self.n_posinf,
            "n_neginf": self.n_neginf,
            "n_zero": self.n_zero,
        }


def chunk_elements() -> int:
    """Elements per partial sum: windows fed to an Accumulator are whole multiples of it."""
    return _kernel().stats_chunk()


def histogram_min_elements() -> int:
    """bf16/f16 windows of at least this many elements go through the histogram path."""
    return _kernel().stats_hist_min()


class Accumulator:
    """Statistics of a tensor fed as consecutive windows of raw elements (each a multiple of the chunk,
    except the last), so a huge tensor never needs to be mapped or dequantized whole."""

    def __init__(self, dtype: str, first: np.ndarray):
        """`first` holds the tensor's first element, as values or raw bytes (empty: an empty tensor)."""
        self.code, self.shift, self.numel = DTYPE_CODES[dtype], shift_of(first, dtype), 0
        self.acc = _Stats(0, 0, 0, 0, 0, 0.0, 0.0, float("inf"), float("-inf"))

    def add(self, address: int, n: int) -> None:
        assert self.numel % chunk_elements() == 0, "only the last window may be a partial chunk"
        if n and _kernel().stats_update(ctypes.byref(self.acc), address, n, self.code, self.shift):
            raise MemoryError("the statistics kernel could not allocate its partials")
        self.numel += n

    def result(self) -> Stats:
        a = self.acc
        nf = a.n_finite
        mean_d = a.sum / nf if nf else float("nan")
        var = max(0.0, a.sumsq / nf - mean_d * mean_d) if nf else float("nan")
        return Stats(
            self.numel,
            a.n_nan,
            a.n_posinf,
            a.n_neginf,
            a.n_zero,
            a.min if nf else float("nan"),
            a.max if nf else float("nan"),
            self.shift + mean_d,
            var**0.5,
        )


def array_stats(a: np.ndarray, dtype: str | None = None) -> Stats:
    """Statistics of a contiguous array in one pass; `dtype` names its element type when the array
    holds raw bits (bf16 arrives as uint16/int16)."""
    a = np.ascontiguousarray(a)
    dtype = dtype or a.dtype.name
    flat = a.reshape(-1)
    acc = Accumulator(dtype, flat[:1])
    acc.add(a.ctypes.data, flat.size)
    return acc.result()


def shift_of(first: np.ndarray, dtype: str) -> float:
    """The value the sums are taken around, which keeps the variance exact far from zero: the first
    element (`first` holds it as values or raw bytes) when finite, else 0."""
    raw = np.ascontiguousarray(first).reshape(-1).view(np.uint8)
    if raw.size == 0:
        return 0.0
    if dtype == "bfloat16":
        v = float((raw[:2].view(np.uint16).astype(np.uint32) << 16).view(np.float32)[0])
    else:
        v = float(raw[: np.dtype(dtype).itemsize].view(dtype)[0])
    return v if np.isfinite(v) else 0.0
