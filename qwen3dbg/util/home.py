"""What qwen3dbg keeps for itself under $QWEN3DBG_HOME (default ~/.cache/qwen3dbg): the embedded default
models, compiled kernels, what older versions left. `qwen3dbg cache` lists and clears it; whenever an entry is
added, the least recently used go until the whole fits `QWEN3DBG_CACHE_BUDGET` (`10GB`, `500MB`, `0`; default 10 GB)."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qwen3dbg.util.errors import UserError


def home(*parts: str) -> Path:
    """$QWEN3DBG_HOME (default ~/.cache/qwen3dbg), joined with `parts`."""
    return Path(os.environ.get("QWEN3DBG_HOME", Path.home() / ".cache" / "qwen3dbg")).joinpath(*parts)


BUDGET_ENV = "QWEN3DBG_CACHE_BUDGET"
DEFAULT_BUDGET = 10 * 1000**3
#: the folders of the home that hold cache entries (one entry per child), and what each child is
KINDS = {"models": "default model", "kernels": "kernel", "runs": "old run", "tmp": "temporary"}
#: an entry used this recently is never evicted: a running diff may be reading it
RECENT_S = 600
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str
    size: int  # bytes
    last_used: float  # seconds since the epoch: the newest modification time inside it


def parse_size(text: str) -> int:
    """'10GB', '500 MB', '1.5GiB', '0' or bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and _UNITS.get(m.group(2).lower())
    if unit is None:
        raise UserError(f"{BUDGET_ENV} is {text!r}, not a size: write e.g. 10GB, 500MB or 0")
    return int(float(m.group(1)) * unit)


def budget() -> int:
    text = os.environ.get(BUDGET_ENV)
    return DEFAULT_BUDGET if text is None else parse_size(text)


def _walk(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of a file or a folder, symlinks not followed."""
    st = path.lstat()
    size, newest = st.st_size, st.st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                s = Path(root, name).lstat()
                size, newest = size + (s.st_size if name in files else 0), max(newest, s.st_mtime)
    return size, newest


def entries() -> list[Entry]:
    """Every entry of the cache, least recently used first."""
    found = []
    for folder, kind in KINDS.items():
        root = home(folder)
        if root.is_dir():
            for child in root.iterdir():
                size, used = _walk(child)
                found.append(Entry(child, kind, size, used))
    return sorted(found, key=lambda e: e.last_used)


#: candidates/mine/build.py names its builds so; torch's extension builder keeps them in its own folder
ENGINE_PREFIX = "qwen3dbg_"


def engine_builds() -> list[Entry]:
    """The compiled engines torch keeps for us outside the home (`TORCH_EXTENSIONS_DIR`, or one folder per
    Python and accelerator under torch's default root): listed and cleared with the cache, never evicted by
    the budget, since a rebuild takes minutes."""
    from torch.utils.cpp_extension import get_default_build_root

    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    found = (
        Path(given).glob(ENGINE_PREFIX + "*") if given else Path(get_default_build_root()).glob(f"*/{ENGINE_PREFIX}*")
    )
    return [Entry(p, "engine build", *_walk(p)) for p in sorted(found) if p.is_dir() and not p.is_symlink()]


def listing() -> list[Entry]:
    """What `qwen3dbg cache` lists: the home's entries and the engine builds, least recently used first."""
    return sorted(entries() + engine_builds(), key=lambda e: e.last_used)


def remove(entry: Entry) -> None:
    if entry.path.is_dir() and not entry.path.is_symlink():
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)


def fit(keep: Path | None = None) -> list[Entry]:
    """Evict the least recently used entries until the cache fits its budget (never `keep`, nor an entry
    used in the last RECENT_S seconds); returns what went."""
    limit, now = budget(), time.time()
    found = entries()
    total = sum(e.size for e in found)
    gone = []
    for e in found:
        if total <= limit:
            break
        if e.path == keep or now - e.last_used < RECENT_S:
            continue
        remove(e)
        total -= e.size
        gone.append(e)
    return gone


def clear() -> list[Entry]:
    """Remove everything `listing()` shows; returns it."""
    found = listing()
    for e in found:
        remove(e)
    return found
