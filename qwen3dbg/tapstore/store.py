"""Tap stores: a directory of `manifest.json` plus one `step_{s:04d}.safetensors` per step; docs/taps.md states
the rules for strangers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import safe_open

from qwen3dbg.model.safetensors_stream import StreamingWriter
from qwen3dbg.tapstore.schema import FORMAT, MANIFEST
from qwen3dbg.util.dtypes import dtype_name, parse_dtype
from qwen3dbg.util.errors import UserError

#: a decode step's cache tap up to this size is written whole, past it as the slots the step wrote
FULL_CACHE_BYTES = 4 << 20
#: the optional fields of a step entry that say which slots or rows some taps hold (docs/taps.md), in
#: StepInfo's order
ROW_KEYS = ("cache_positions", "attention_positions", "logits_positions")


def step_file(step: int) -> str:
    return f"step_{step:04d}.safetensors"


@dataclass(frozen=True)
class Shard:
    """How one rank holds a tap (docs/taps.md, "Tensor-parallel runs"): `split`, the slice [start, stop) of
    the whole tap's `axis` (column-parallel: heads or channels); `replicated`, a whole copy every rank holds
    alike; `partial`, a whole-shaped addend of an all-reduce (row-parallel) that the ranks' sum completes."""

    kind: str
    axis: int | None = None
    start: int | None = None
    stop: int | None = None

    def to_json(self) -> str | dict:
        return {"axis": self.axis, "start": self.start, "stop": self.stop} if self.kind == "split" else self.kind

    @classmethod
    def parse(cls, value) -> "Shard":
        """A manifest's `shards` entry -> Shard; ValueError saying what is wrong with it."""
        if value in ("replicated", "partial"):
            return cls(value)
        if not isinstance(value, dict) or sorted(value) != ["axis", "start", "stop"]:
            raise ValueError('is neither "replicated", "partial" nor a split {"axis": a, "start": i, "stop": j}')
        axis, start, stop = value["axis"], value["start"], value["stop"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (axis, start, stop)):
            raise ValueError("a split's axis, start and stop must be integers")
        if not 0 <= start < stop:
            raise ValueError(f"a split's slice [{start}, {stop}) must satisfy 0 <= start < stop")
        return cls("split", axis, start, stop)


REPLICATED = Shard("replicated")


@dataclass(frozen=True)
class RankInfo:
    """What a store written by one rank says of it: its rank, the world size and each tap's layout, keyed
    by op (`q_proj`: every layer) or by tap name (`layers.3.q_proj`: that tap, before its op's entry);
    a tap named by neither is replicated."""

    rank: int
    world_size: int
    shards: dict[str, Shard] = field(default_factory=dict)

    def shard(self, name: str) -> Shard:
        from qwen3dbg.tapstore.schema import parse_tap_name

        return self.shards.get(name) or self.shards.get(parse_tap_name(name)[1]) or REPLICATED

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": {k: v.to_json() for k, v in self.shards.items()},
        }

    @classmethod
    def parse(cls, m: dict) -> "RankInfo | None":
        """The manifest's rank fields, None for a store of a whole run (no `rank`); ValueError if malformed."""
        if "rank" not in m and "world_size" not in m and "shards" not in m:
            return None
        rank, world, shards = m.get("rank"), m.get("world_size"), m.get("shards", {})
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (rank, world)) or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} and world_size {world!r} must be integers with 0 <= rank < world_size")
        if not isinstance(shards, dict):
            raise ValueError("shards must be an object mapping ops or tap names to their layout")
        parsed = {}
        for key, value in shards.items():
            try:
                parsed[key] = Shard.parse(value)
            except ValueError as e:
                raise ValueError(f"shards[{key!r}] {e}") from None
        return cls(rank, world, parsed)


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


# The writer streams each tap to disk as it is produced (see safetensors_stream), so memory never holds more than
# the tap being written.
class StoreWriter:
    """Writes a tap store step by step; the manifest says `complete` only after `close()`.

    Used as a context manager, an exception mid-run leaves a manifest with `complete: false`,
    which readers refuse to compare. The directory is locked while the writer is open; one holding a
    store already is refused unless `replace` is true, and then that store is marked incomplete before
    any of its files is removed. A rank of a tensor-parallel run passes `rank` (its rank, the world size and
    its taps' layouts) and hands each tap as that rank holds it.
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
        rank: RankInfo | None = None,
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
            **(rank.to_json() if rank is not None else {}),
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
    from qwen3dbg.util.jsonio import read_given_json

    mpath = Path(path) / MANIFEST
    m = read_given_json(
        mpath,
        missing=f"{path} is not a tap store: it has no {MANIFEST}",
        unusable=lambda why: f"{mpath} is not a manifest: {why}; the writer died while writing it, or it is not one",
    )
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

    @cached_property
    def rank(self) -> RankInfo | None:
        """The rank that wrote this store and its taps' layouts; None for a store of a whole run."""
        try:
            return RankInfo.parse(self.manifest)
        except ValueError as e:
            raise UserError(f"{self.path / MANIFEST}: {e}") from None

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
