"""Taps too large to hold whole (the golden's attention matrices and logits at real lengths), compared block by
block along their token axis."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from qwen3dbg.diff.fused import TapErrors, count_over, tap_errors
from qwen3dbg.diff.metrics import ErrorStats, ratio

#: elements of one float64 block: 32 MB, so a block of each side stays well inside memory
BLOCK_ELEMENTS = 1 << 22


# At real lengths the golden's attention matrices ([B,nH,T,S] in float64: 680 MB a layer at 2304 tokens) and
# logits ([B,T,V]: 2.8 GB) never exist whole: the golden hands them out as `RowBlocks`, a recipe that computes any
# run of rows on demand, and the comparison folds the per-block statistics into one tap's.
@dataclass(frozen=True)
class RowBlocks:
    """A tap of `shape` computed rows [r0, r1) at a time along `axis` by `compute(r0, r1)`, seen through a
    window: rows [start, stop) and, on the last axis, the first `cols` entries (a step's cache length)."""

    shape: tuple[int, ...]
    axis: int
    compute: Callable[[int, int], torch.Tensor]
    start: int = 0
    stop: int | None = None
    cols: int | None = None
    #: elements of one block: each costs `compute` its fixed overhead (the logits' lm_head conversion) once
    block_elements: int = BLOCK_ELEMENTS

    @property
    def rows(self) -> int:
        return (self.shape[self.axis] if self.stop is None else self.stop) - self.start

    @property
    def view_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.axis] = self.rows
        if self.cols is not None:
            shape[-1] = self.cols
        return tuple(shape)

    def restrict(self, start: int, stop: int, cols: int | None = None) -> "RowBlocks":
        """The window rows [start, stop) of this view (relative to it) and its first `cols` columns."""
        return replace(
            self, start=self.start + start, stop=self.start + stop, cols=cols if cols is not None else self.cols
        )

    def block_rows(self) -> int:
        per_row = math.prod(self.view_shape) // max(self.rows, 1)
        return max(1, self.block_elements // max(per_row, 1))

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset in the window's rows, the block's values) in row order."""
        step = self.block_rows()
        for r in range(0, self.rows, step):
            yield r, self.take(r, min(r + step, self.rows))

    def take(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the window, computed now."""
        t = self.compute(self.start + r0, self.start + r1)
        return t if self.cols is None else t[..., : self.cols]

    def whole(self) -> torch.Tensor:
        """The window materialised (for the small ones: one decode step's rows, a diagnosis window)."""
        return self.take(0, self.rows)


def value_of(t: torch.Tensor | RowBlocks) -> torch.Tensor:
    """A tap whole, whether it came whole or as row blocks."""
    return t.whole() if isinstance(t, RowBlocks) else t


def blocked_errors(
    gold: RowBlocks,
    ref: torch.Tensor,
    cand: torch.Tensor,
    scores: bool,
    keep: torch.Tensor | None,
    also: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    row: int = 0,
) -> TapErrors:
    """`tap_errors` of a golden computed in blocks: each block against the same rows of both sides, folded;
    `also(gold, ref, cand)` sees each block too (the logits' agreement, without computing the golden again);
    `row` (the last axis's length, blocks being cut along another): the per-row sums in the view's order."""
    assert not row or gold.axis < len(gold.shape) - 1, "a row must not straddle two blocks"
    parts = []
    for r, g in gold.blocks():
        rr, cc, kk = _rows(gold.axis, r, g.shape[gold.axis], ref, cand, keep)
        parts.append((r, tap_errors(g, rr, cc, scores=scores, keep=kk, row=row)))
        if also is not None:
            also(g, rr, cc)
    return _fold(parts, gold.axis, gold.view_shape)


def blocked_count_over(
    gold: RowBlocks, ref: torch.Tensor, cand: torch.Tensor, limit: float, scores: bool, keep: torch.Tensor | None
) -> int:
    """`count_over` of a golden computed in blocks (recomputed: the second pass is rare and exact)."""
    total = 0
    for r, g in gold.blocks():
        rr, cc, kk = _rows(gold.axis, r, g.shape[gold.axis], ref, cand, keep)
        total += count_over(g, rr, cc, limit, scores=scores, keep=kk)
    return total


def _rows(axis: int, r: int, n: int, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t if t is None or t.shape[axis] == 1 else t.narrow(axis, r, n) for t in ts]


def _fold(parts: list[tuple[int, TapErrors]], axis: int, shape: tuple[int, ...]) -> TapErrors:
    """Sums add, maxima take the larger (the first block on a tie, as torch's argmax), and the worst
    element's flat index is moved from its block into the whole view."""
    nonfinite = {k: sum(p.nonfinite[k] for _, p in parts) for k in ("ref", "cand", "gold")}
    ss = lambda f: sum(f(p) ** 2 for _, p in parts)  # noqa: E731
    gold_norm = math.sqrt(ss(lambda p: p.gold_norm))
    cand_norm, ref_norm = math.sqrt(ss(lambda p: p.cand.norm)), math.sqrt(ss(lambda p: p.ref.norm))
    worst_r, worst = max(parts, key=lambda rp: rp[1].cand.max_abs)  # max keeps the first of equals
    block_shape = list(shape)
    block_shape[axis] = _block_len(parts, worst_r, shape[axis])
    argmax = _moved(worst.cand.argmax, block_shape, axis, worst_r, shape)
    rows = None
    if parts[0][1].rows is not None:  # each block's rows [sums, ...block shape but the last axis], joined on axis
        pieces = [p.rows.reshape(p.rows.shape[0], *shape[:axis], -1, *shape[axis + 1 : -1]) for _, p in parts]
        rows = np.concatenate(pieces, axis=axis + 1).reshape(pieces[0].shape[0], -1)
    return TapErrors(
        count=sum(p.count for _, p in parts),
        nonfinite=nonfinite,
        mask_diff=sum(p.mask_diff for _, p in parts),
        cand=ErrorStats(worst.cand.max_abs, ratio(cand_norm, gold_norm), argmax, cand_norm),
        ref=ErrorStats(max(p.ref.max_abs for _, p in parts), ratio(ref_norm, gold_norm), 0, ref_norm),
        gold_norm=gold_norm,
        gold_max=max(p.gold_max for _, p in parts),
        dot=sum(p.dot for _, p in parts),
        diff_norm=math.sqrt(ss(lambda p: p.diff_norm)),
        rows=rows,
    )


def _block_len(parts: list[tuple[int, TapErrors]], r: int, rows: int) -> int:
    starts = [s for s, _ in parts]
    i = starts.index(r)
    return (starts[i + 1] if i + 1 < len(starts) else rows) - r


def _moved(flat: int, block_shape: list[int], axis: int, offset: int, shape: tuple[int, ...]) -> int:
    """A flat index into a block of `block_shape` -> the flat index of the same element in `shape`."""
    idx = []
    for size in reversed(block_shape):
        flat, i = divmod(flat, size) if size else (flat, 0)
        idx.append(i)
    idx.reverse()
    idx[axis] += offset
    out = 0
    for size, i in zip(shape, idx):
        out = out * size + i
    return out
