"""The taps of a tensor-parallel run: each rank's shard gathered into the whole tap, one tap at a time, and
a divergence of the gathered tap traced back to a rank (docs/taps.md, "Tensor-parallel runs").

Pure functions on one tap's shards; `RankStores` (the ranks' stores as one side) only reads them in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwen3dbg.tapstore.store import Shard, TapStore


@dataclass(frozen=True)
class Part:
    """One rank's shard of a tap, as the rank holds it: a slice, a whole copy, or a whole-shaped addend."""

    rank: int
    shard: Shard
    value: torch.Tensor


@dataclass(frozen=True)
class Gathered:
    """A tap gathered from its ranks. `value` is the whole tap as the comparison sees it (`view` of the gathered
    tensor: cache slots, query rows); `parts` are the ranks' shards, ordered by rank."""

    value: object
    whole: torch.Tensor
    kind: str
    parts: tuple[Part, ...]
    view: Callable[[torch.Tensor], object]

    @property
    def axis(self) -> int | None:
        return self.parts[0].shard.axis

    def groups(self) -> list[list[Part]]:
        """The parts that hold the same elements, each group ordered by rank: one group of all ranks for a
        replicated tap, one per distinct slice for a split one (ranks with the same slice hold copies of it),
        none for a partial sum."""
        if self.kind == "partial":
            return []
        if self.kind == "replicated":
            return [list(self.parts)]
        slices: dict[tuple[int, int], list[Part]] = {}
        for p in self.parts:
            slices.setdefault((p.shard.start, p.shard.stop), []).append(p)
        return [slices[k] for k in sorted(slices)]

    def disagreeing(self) -> list[tuple[int, Part]]:
        """(the group's lowest rank, the copy) of each copy that differs bitwise from its group's lowest rank's,
        the one gathered."""
        return [
            (group[0].rank, p) for group in self.groups() for p in group[1:] if not same_bits(p.value, group[0].value)
        ]

    def variant(self, part: Part) -> object:
        """The whole tap with `part`'s copy in place of the one gathered: the tap as rank `part.rank` holds it."""
        if self.kind == "replicated":
            return self.view(part.value)
        whole = self.whole.clone()
        whole.narrow(part.shard.axis, part.shard.start, part.shard.stop - part.shard.start).copy_(part.value)
        return self.view(whole)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (an unchanged NaN is unchanged)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def gather(parts: list[Part]) -> torch.Tensor:
    """The whole tap from its ranks' shards (validated: one kind, slices covering the axis once):
    split -> the distinct slices concatenated along their axis, each from its lowest rank;
    replicated -> the lowest rank's copy; partial -> the sum of the addends, in float32 at least (float64
    for float64 shards) and rounded once to the shards' dtype, as an all-reduce of exact addends would.
    Shapes: split parts [..., stop-start, ...] -> [..., N, ...]; the others [...] -> [...]."""
    kind = parts[0].shard.kind
    if kind == "replicated":
        return parts[0].value
    if kind == "partial":
        dtype = parts[0].value.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        total = parts[0].value.to(acc, copy=True)
        for p in parts[1:]:
            total += p.value
        return total.to(dtype)
    firsts: dict[int, Part] = {}
    for p in parts:
        firsts.setdefault(p.shard.start, p)
    return torch.cat([firsts[s].value for s in sorted(firsts)], dim=parts[0].shard.axis)


def gathered(parts: list[Part], view: Callable[[torch.Tensor], object] = lambda t: t) -> Gathered:
    """One tap of every rank gathered (`gather`), kept with its parts so that the comparison can trace a
    divergence back to a rank: what a side hands the comparison for a tensor-parallel run, a store's
    (`RankSide`) or a live one's. `view` is how the side presents a whole tap (cache slots, query rows)."""
    whole = gather(parts)
    return Gathered(view(whole), whole, parts[0].shard.kind, tuple(parts), view)


def slice_words(axis_name: str, start: int, stop: int, head_dim: int) -> str:
    """A rank's slice of a schema axis in the porter's units: `nH*D` 64..127 of head_dim 32 -> "heads 2..3";
    `nKV` 1..1 -> "kv head 1"; any other axis -> "channels 80..159"."""
    heads = axis_name.split("*")[0]
    if heads in ("nH", "nKV"):
        if "*" in axis_name:
            if start % head_dim or stop % head_dim:
                return f"channels {start}..{stop - 1} (not whole heads of {head_dim})"
            start, stop = start // head_dim, stop // head_dim
        what = "head" if heads == "nH" else "kv head"
        return f"{what} {start}" if stop - start == 1 else f"{what}s {start}..{stop - 1}"
    return f"channel {start}" if stop - start == 1 else f"channels {start}..{stop - 1}"


def partial_fits(error: torch.Tensor, partials: list[Part]) -> list[tuple[int, float, float]]:
    """(rank, factor a, cosine) for each rank: the a that makes a * its addend closest to `error` (the gathered
    sum minus fp64's), least squares. Whether what is left over is mere rounding is the differ's call: it judges
    the sum with a * addend taken out against the noise floor, as it judges any tap."""
    e = error.double().flatten()
    en = float(e.norm())
    fits = []
    for p in partials:
        v = p.value.double().flatten()
        vn = float(v.norm())
        if en and vn:
            dot = float(e @ v)
            fits.append((p.rank, dot / vn**2, dot / (en * vn)))
    return fits


class RankStores:
    """The stores of one tensor-parallel run, one per rank, read as one store whose taps are gathered: what
    `store:DIR0,DIR1,...` names. Steps, dtype, ids and notes are rank 0's (validate_ranks checked that the
    ranks agree)."""

    def __init__(self, stores: list[TapStore]):
        self.stores = sorted(stores, key=lambda s: s.rank.rank)
        first = self.stores[0]
        self.path, self.manifest, self.steps = first.path, first.manifest, first.steps
        self.world_size = first.rank.world_size

    @classmethod
    def open(cls, paths: list[Path]) -> "RankStores":
        stores = [TapStore.open(p) for p in paths]
        assert all(s.rank is not None for s in stores), "validate_ranks refuses a store that names no rank"
        return cls(stores)

    @property
    def implementation(self) -> str:
        return f"{self.stores[0].implementation} (tensor-parallel, {self.world_size} ranks)"

    @property
    def dtype(self) -> torch.dtype:
        return self.stores[0].dtype

    @property
    def missing_taps(self) -> list[str]:
        return self.stores[0].missing_taps

    def has(self, step: int, name: str) -> bool:
        return self.stores[0].has(step, name)

    def parts(self, step: int, name: str) -> list[Part]:
        """Every rank's shard of tap `name` at `step`, read now."""
        return [Part(s.rank.rank, s.rank.shard(name), s.get(step, name)) for s in self.stores]
