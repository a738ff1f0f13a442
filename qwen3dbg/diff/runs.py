"""Running the sides of a diff into tap stores, and caching the reference runs on disk.

The fp64 golden and the named references (`hf`, `scratch`) are cached under `$QWEN3DBG_HOME/runs`
(default ~/.cache/qwen3dbg/runs), keyed by the model's identity, the ids, the dtype, the options and
the library versions; a candidate is run afresh every time into a scratch directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from qwen3dbg.candidate import Candidate
from qwen3dbg.capture import capture
from qwen3dbg.dtypes import dtype_name
from qwen3dbg.home import home
from qwen3dbg.registry import load_candidate
from qwen3dbg.store import MANIFEST, StepInfo, TapStore

#: implementations whose runs are cached: their taps are a function of the key alone
REFERENCES = frozenset({"hf", "scratch"})


def runs_home() -> Path:
    root = home("runs")
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_identity(model_dir: Path) -> dict:
    """config.json's digest plus each safetensors file's name, size and mtime: cheap, and any rewrite changes it."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    return {"dir": str(Path(model_dir).resolve()),
            "config": hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest(),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def run_key(name: str, options: dict, model_dir: Path, steps: list[StepInfo], dtype: torch.dtype) -> str:
    key = {"impl": name, "options": sorted(options.items()), "model": model_identity(model_dir),
           "ids": [(s.token_ids, s.positions) for s in steps], "dtype": dtype_name(dtype),
           "versions": [version("qwen3dbg"), torch.__version__,
                        version("transformers") if name == "hf" else ""]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cached_run(name: str, options: dict, model_dir: Path, steps: list[StepInfo], dtype: torch.dtype) -> tuple[TapStore, bool]:
    """The store of reference `name` on these steps, from the cache or captured now; (store, was_cached)."""
    final = runs_home() / f"{name}-{dtype_name(dtype)}-{run_key(name, options, model_dir, steps, dtype)}"
    if (final / MANIFEST).is_file():
        store = TapStore.open(final, require_complete=False)
        if store.manifest.get("complete"):
            return store, True
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=runs_home()))
    try:
        capture(load_candidate(name, model_dir, dtype, **options), steps, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TapStore.open(final), False


def fresh_run(name: str, options: dict, model_dir: Path, steps: list[StepInfo], dtype: torch.dtype,
              workdir: Path) -> tuple[TapStore, Candidate]:
    """Run a candidate into a new store under `workdir`; the loaded candidate comes back for teacher forcing."""
    cand = load_candidate(name, model_dir, dtype, **options)
    out = Path(tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] + "-", dir=workdir))
    capture(cand, steps, out)
    return TapStore.open(out), cand
