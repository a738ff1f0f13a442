"""Building the `mine` extension on first use with torch.utils.cpp_extension (ninja), cached per machine: the CPU
twin always, the CUDA kernels where torch has CUDA and nvcc, or on the CPU for `emulated` (csrc/cuda_emu.h)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# No contraction of a*b+c into an FMA on either side: the twin and the kernels round op by op alike.
# -march=native: the build is per machine, and the twin's GEMV transposes with AVX2 where it can.
HOST_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-fmad=false", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def cuda_available() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


@functools.cache
def load(emulated: bool = False):
    """The compiled module (functions of csrc/bindings.cpp); compiles once, then loads from the cache.
    `emulated`: the CUDA kernels built by the host compiler and run on the CPU by csrc/cuda_emu.h."""
    import torch
    from rich.console import Console
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as cpp_load

    from qwen3dbg.util.cbuild import host_isa

    with_cuda = cuda_available() and not emulated
    sources = [CSRC / "bindings.cpp", CSRC / "twin.cpp"]
    if emulated:
        name, what = "qwen3dbg_mine_emulated", "CUDA kernels emulated on the CPU"
        flags = ["-DMINE_EMULATE_CUDA", "-fno-strict-aliasing"]  # kernels copy T data as uint4, as GPUs do
        sources.append(CSRC / "kernels_emulated.cpp")
    elif with_cuda:
        name, what, flags = "qwen3dbg_mine_cuda", "CPU twin + CUDA kernels", ["-DMINE_WITH_CUDA"]
        sources.append(CSRC / "kernels.cu")
    else:
        name, what, flags = "qwen3dbg_mine_cpu", "CPU twin", []
    name += f"_{host_isa()}"  # built with -march=native: one build per CPU kind
    build_dir = Path(_get_build_directory(name, verbose=False))
    _drop_stale_lock(build_dir / "lock")
    fresh = not any(build_dir.glob("*.so"))
    console = Console(stderr=True)
    status = console.status(f"compiling the mine engine ({what}); this happens once and takes a minute or two")
    if fresh:
        status.start()
    try:
        module = cpp_load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=HOST_FLAGS + flags,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=["-fopenmp"],
            with_cuda=with_cuda,
            verbose=bool(os.environ.get("QWEN3DBG_BUILD_VERBOSE")),
        )
    finally:
        status.stop()
    if fresh:
        console.print(f"built the mine engine ({what}) with torch {torch.__version__}")
    return module


#: a build takes minutes; torch's build lock older than this was left by a build that was killed
STALE_LOCK_S = 1800


def _drop_stale_lock(lock: Path) -> None:
    """torch waits on its build lock forever: a build killed mid-way (Ctrl-C, a CI timeout) would hang
    every later use of the engine. A lock no build has touched for STALE_LOCK_S is removed."""
    import time

    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass
