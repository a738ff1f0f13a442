"""Small C kernels built with the system C compiler on first use and cached under $QWEN3DBG_HOME/kernels."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path

from qwen3dbg.util.errors import UserError
from qwen3dbg.util.home import home

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', re.M)


#: the flags of the reduction kernels (the differ's comparison, the scan's statistics): -fassociative-math
#: vectorizes their sums, whose order is then fixed per build, and changes no NaN handling (their
#: finiteness tests are on the bits)
REDUCTION_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fassociative-math",
]


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


def _texts(source: Path) -> list[str]:
    """The text of `source` and of every header it includes by a quoted name, recursively: all the build reads
    besides the system's headers."""
    text = source.read_text()
    return [text, *(t for header in _LOCAL_INCLUDE.findall(text) for t in _texts(source.parent / header))]


def build(name: str, source: Path, flags: list[str], what: str) -> ctypes.CDLL:
    """The library compiled from the C file `source` with `flags`, cached by a hash of its text, its local
    headers', the flags, the compiler and the CPU; `what` names the kernel in a user error ("the scan's
    statistics kernel")."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(("".join(_texts(source)) + " ".join([cc, *flags, host_isa()])).encode()).hexdigest()[:16]
    so = cache_dir() / f"{name}-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *flags, str(source), "-o", str(tmp)], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError(
                f"{what} needs a C compiler and {cc!r} was not found: install gcc (e.g. apt-get install gcc) or set CC"
            ) from None
        except subprocess.CalledProcessError as e:
            raise UserError(f"building {what} with {cc} failed: {e.stderr.strip()[:500]}") from None
        tmp.replace(so)  # atomic: a concurrent process sees the whole library or none
    return ctypes.CDLL(str(so))
