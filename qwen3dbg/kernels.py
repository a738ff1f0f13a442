"""Small C kernels built with the system C compiler on first use and cached under $QWEN3DBG_HOME/kernels."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

from qwen3dbg.errors import UserError
from qwen3dbg.home import home


#: C helpers widening each stored element type to double exactly (needs <stdint.h>, <string.h>)
WIDEN = r"""
static inline double from_f64(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline double from_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline double from_bf16(uint16_t u) { return from_f32((uint32_t)u << 16); }
/* Exact and vectorizable (a _Float16 cast becomes a library call per element): the magnitude bits
   moved to a float's place and scaled by 2^112, which also normalizes subnormals; all-ones exponents
   are set to inf/NaN, then the sign. */
static inline double from_f16(uint16_t h) {
    uint32_t mag = (uint32_t)(h & 0x7fff) << 13, u;
    float f;
    memcpy(&f, &mag, 4);
    f *= 0x1p112f;
    memcpy(&u, &f, 4);
    u |= (h & 0x7c00) == 0x7c00 ? 0x7f800000u : 0u;
    u |= (uint32_t)(h & 0x8000) << 16;
    return from_f32(u);
}
"""


def cache_dir() -> Path:
    return home("kernels")


@functools.cache
def host_isa() -> str:
    """A short tag of this CPU's instruction set. Builds use -march=native, so they are cached per tag:
    a cache shared between machines (an NFS home, a CI cache) never loads code built for another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build(name: str, source: str, flags: list[str], what: str) -> ctypes.CDLL:
    """The library compiled from `source` with `flags`, cached by a hash of both (and the compiler and CPU);
    `what` names the kernel in a user error ("the scan's statistics kernel")."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256((source + " ".join([cc, *flags, host_isa()])).encode()).hexdigest()[:16]
    so = cache_dir() / f"{name}-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        src, tmp = so.with_suffix(".c"), so.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(source)
        try:
            subprocess.run([cc, *flags, str(src), "-o", str(tmp)], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError(f"{what} needs a C compiler and {cc!r} was not found: "
                            "install gcc (e.g. apt-get install gcc) or set CC") from None
        except subprocess.CalledProcessError as e:
            raise UserError(f"building {what} with {cc} failed: {e.stderr.strip()[:500]}") from None
        tmp.replace(so)  # atomic: a concurrent process sees the whole library or none
    return ctypes.CDLL(str(so))
