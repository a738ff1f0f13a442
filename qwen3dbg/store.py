"""Tap stores: a directory of `manifest.json` plus one `step_{s:04d}.safetensors` per step.

The writer streams each tap to disk as it is produced (see safetensors_stream), so memory never
holds more than the tap being written; the reader is lazy and maps one tensor at a time. docs/taps.md
states the rules for strangers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import safe_open

from qwen3dbg.dtypes import dtype_name, parse_dtype
from qwen3dbg.errors import UserError
from qwen3dbg.safetensors_stream import StreamingWriter
from qwen3dbg.taps import FORMAT, MANIFEST


#: a decode step's cache tap up to this size is written whole, past it as the slots the step wrote
FULL_CACHE_BYTES = 4 << 20
#: the optional fields of a step entry that say which slots or rows some taps hold (docs/taps.md), in
#: StepInfo's order
ROW_KEYS = ("cache_positions", "attention_positions", "logits_positions")


def step_file(step: int) -> str:
    return f"step_{step:04d}.safetensors"


class TapSink(Protocol):
    """Where an implementation hands its taps. `wants` lets it skip work for unselected taps."""

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class StepInfo:
    step: int
    token_ids: list[list[int]]  # [B][T]
    positions: list[list[int]]  # [B][T]
    #: the logical positions (S indices) this step's k_cache/v_cache hold, [B,nKV,n,D]; None: the whole cache
    cache_positions: list[int] | None = None
    #: the query positions whose rows attn_scores/attn_probs hold, [B,nH,n,S]; None: every token of the step
    attention_positions: list[int] | None = None
    #: the positions whose rows logits holds, [B,n,V] (a serving engine computes logits at sampled rows only);
    #: None: every token of the step
    logits_positions: list[int] | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids[0])


def lock_dir(path: Path) -> int:
    """Hold an exclusive lock on directory `path` (flock on the directory itself, as the C header's writer
    takes it) and return its descriptor; the lock goes when the descriptor is closed or the process dies.
    A second writer into the same directory is refused instead of interleaving its steps with ours."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"another writer is writing a tap store into {path}: wait for it to finish, "
            "or choose another --out directory"
        ) from None
    return fd


def check_out_dir(path: Path, replace: bool) -> None:
    """Refuse to write a store into `path` when it holds other files, or a store unless `replace`: the
    writer asks under its lock, the CLI before the run."""
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not held:
        return
    if MANIFEST not in held:
        raise UserError(
            f"{path} exists and is not a tap store (it holds {held[0]}): choose an empty or new --out directory"
        )
    if not replace:
        raise UserError(
            f"{path} holds a tap store already: pass --replace to overwrite it, or choose another --out directory"
        )


class StoreWriter:
    """Writes a tap store step by step; the manifest says `complete` only after `close()`.

    Used as a context manager, an exception mid-run leaves a manifest with `complete: false`,
    which readers refuse to compare. The directory is locked while the writer is open; one holding a
    store already is refused unless `replace` is true, and then that store is marked incomplete before
    any of its files is removed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        implementation: str,
        dtype: torch.dtype | str,
        batch: int,
        *,
        select: Iterable[str] | None = None,
        missing_taps: Iterable[str] = (),
        extra: dict | None = None,
        cache_slots: bool = True,
        replace: bool = False,
    ):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = lock_dir(self.dir)
        try:
            check_out_dir(self.dir, replace)
        except BaseException:
            self._unlock()
            raise
        self.manifest = {
            "format": FORMAT,
            "implementation": implementation,
            "dtype": dtype_name(parse_dtype(dtype)),
            "batch": batch,
            "steps": [],
            "complete": False,
            "missing_taps": sorted(set(missing_taps)),
            **(extra or {}),
        }
        self.select = set(select) if select is not None else None
        #: decode steps store the cache slots they wrote, not the whole cache, once a cache tap passes
        #: FULL_CACHE_BYTES (docs/taps.md, "Long runs"); a whole cache lets the differ see old slots change
        self.cache_slots = cache_slots
        self.itemsize = parse_dtype(dtype).itemsize
        self._slots: slice | None = None
        self._step: StreamingWriter | None = None
        self._write_manifest()
        for old in self.dir.glob("step_*.safetensors"):  # after the manifest that says the store is incomplete
            old.unlink()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def wants(self, name: str) -> bool:
        return self._step is not None and name in self._step.plan

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self.wants(name):
            if not isinstance(tensor, torch.Tensor):  # some rows or slots only, as the step entry declares them
                tensor = tensor.values
            if (
                self._slots is not None
                and is_cache_tap(name)
                and tensor.shape[2] != self._slots.stop - self._slots.start
            ):
                tensor = tensor[:, :, self._slots]
            self._step.write(name, tensor)

    def begin_step(self, info: StepInfo, plan: dict[str, tuple[int, ...]]) -> None:
        """Start a step; `plan` maps every tap the implementation will produce to its shape (the cache's
        whole [B,nKV,S,D]: a decode step keeps only its own slots when the writer stores slots)."""
        assert self._step is None, "end_step() the previous step first"
        if self.select is not None:
            plan = {n: s for n, s in plan.items() if n in self.select}
        positions = info.positions[0]
        self._slots = None
        cache_bytes = max((prod(s) * self.itemsize for n, s in plan.items() if is_cache_tap(n)), default=0)
        if self.cache_slots and info.step > 0 and info.cache_positions is None and cache_bytes > FULL_CACHE_BYTES:
            self._slots = slice(positions[0], positions[-1] + 1)
            info = StepInfo(info.step, info.token_ids, info.positions, cache_positions=list(positions))
            plan = {n: (s[:2] + (len(positions),) + s[3:] if is_cache_tap(n) else s) for n, s in plan.items()}
        self._info = info
        self._step = StreamingWriter(self.dir / step_file(info.step), plan)

    def end_step(self) -> None:
        missing = self._step.close()
        self._step = None
        entry = {"step": self._info.step, "token_ids": self._info.token_ids, "positions": self._info.positions}
        for key in ROW_KEYS:
            if getattr(self._info, key) is not None:
                entry[key] = getattr(self._info, key)
        if missing:
            entry["missing"] = missing
        self.manifest["steps"].append(entry)
        self._write_manifest()

    def close(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()
        self._unlock()

    def _write_manifest(self) -> None:
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(_manifest_json(self.manifest))
        os.replace(tmp, self.dir / MANIFEST)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._step is not None:
            self._step.abort()
        if exc_type is None:
            self.close()
        self._unlock()


def read_manifest(path: Path) -> dict:
    """A store's manifest as a dict, or a UserError when the store cannot be read at all (exit 2)."""
    from qwen3dbg.json_read import JSONReadError, read_json

    mpath = Path(path) / MANIFEST
    if not os.path.lexists(mpath):
        raise UserError(f"{path} is not a tap store: it has no {MANIFEST}")
    try:
        m = read_json(mpath)
    except OSError as e:
        raise UserError(f"cannot read {mpath}: {e.strerror or e}") from None
    except JSONReadError as e:
        raise UserError(f"{mpath} is not a manifest: {e}; the writer died while writing it, or it is not one") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise UserError(f"{mpath}: format is {found!r}, expected {FORMAT!r}")
    return m


def _manifest_json(m: dict) -> str:
    """Indented JSON with each step on one line, so a manifest of long prompts stays readable."""
    steps = ",\n  ".join(json.dumps(s, separators=(", ", ": ")) for s in m["steps"])
    head = json.dumps({k: v for k, v in m.items() if k != "steps"}, indent=1)
    return head[:-2] + ',\n "steps": [\n  ' + steps + "\n ]\n}\n" if steps else json.dumps(m, indent=1)


@dataclass
class TapStore:
    """A store on disk, read lazily: `get(step, name)` maps one tensor."""

    path: Path
    manifest: dict
    steps: list[StepInfo] = field(default_factory=list)
    #: step -> (its safetensors handle, the tap names it holds), opened on first use
    _files: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> "TapStore":
        path = Path(path)
        m = read_manifest(path)
        mpath = path / MANIFEST
        if require_complete and not m.get("complete"):
            raise UserError(
                f"tap store {path} is incomplete (its manifest says complete: false, the writer stopped mid-run): "
                "capture it again"
            )
        try:
            steps = [
                StepInfo(
                    int(s["step"]),
                    [list(map(int, r)) for r in s["token_ids"]],
                    [list(map(int, r)) for r in s["positions"]],
                    *(None if s.get(k) is None else list(map(int, s[k])) for k in ROW_KEYS),
                )
                for s in m["steps"]
            ]
            parse_dtype(m["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{mpath}: malformed step or dtype entry ({e})") from None
        return cls(path, m, steps)

    @property
    def implementation(self) -> str:
        return self.manifest.get("implementation", "?")

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest["dtype"])

    @property
    def missing_taps(self) -> list[str]:
        return list(self.manifest.get("missing_taps", []))

    def _file(self, step: int):
        if step not in self._files:
            p = self.path / step_file(step)
            if not p.is_file():
                raise UserError(f"tap store {self.path} lacks {p.name} for step {step}")
            handle = safe_open(str(p), framework="pt")
            self._files[step] = (handle, frozenset(handle.keys()))
        return self._files[step]

    def names(self, step: int) -> list[str]:
        return list(self._file(step)[0].keys())

    def has(self, step: int, name: str) -> bool:
        return name in self._file(step)[1]

    def get(self, step: int, name: str) -> torch.Tensor:
        return self._file(step)[0].get_tensor(name)


def is_cache_tap(name: str) -> bool:
    return name.endswith((".k_cache", ".v_cache"))


def masked(scores: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the masked attention entries: -inf, or at/below finfo.min / 2 (HF's additive mask)."""
    if not scores.is_floating_point():
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores <= torch.finfo(scores.dtype).min / 2
