"""Streaming comparison of a candidate's taps with the reference's, both judged against the fp64 golden (the rule
itself is in `noise`; docs/differ.md explains it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch

from qwen3dbg.diff.blocks import BLOCK_ELEMENTS, RowBlocks, blocked_count_over, blocked_errors, value_of
from qwen3dbg.diff.diagnosis.systematic import signed_stats
from qwen3dbg.diff.fused import count_over, logits_counts, tap_errors
from qwen3dbg.diff.metrics import agreement, cosine, ratio, router_margin, same_sets, worst_coordinate
from qwen3dbg.diff.noise import ELEMENT_FACTOR, row_excess, tolerance
from qwen3dbg.diff.result import TapResult
from qwen3dbg.tapstore.shards import Gathered, Part, partial_fits, slice_words
from qwen3dbg.diff.streams import CACHE_OPS, CacheSlots, QueryRows, Schedule, Side, written_slots
from qwen3dbg.diff.window import Window
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import TapSpec, step_taps
from qwen3dbg.tapstore.store import StepInfo
from qwen3dbg.util.dtypes import dtype_name


@dataclass
class _Router:
    """What a MoE layer's topk_ids comparison leaves for its topk_weights: ids of each side, tokens to compare."""

    ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gold, ref, cand [B,T,k]
    agree: torch.Tensor  # bool [B,T]


Value = torch.Tensor | RowBlocks | CacheSlots


# Taps are taken one at a time in forward order (steps, layers, schema order) from the three side streams as the
# sides produce them: memory holds a few taps of each side, never a whole step.
@dataclass
class Comparison:
    """One lockstep comparison of three side streams (`streams`): taps are taken in forward order, judged
    and dropped; what outlives a tap is its TapResult, the routing ties, the reference's prefill noise per
    tap and the candidate's cache of the last step (to see a step change slots it did not write)."""

    gold: Side
    ref: Side
    cand: Side
    schedule: Schedule
    cfg: Qwen3Config
    dtype: torch.dtype
    window: Window | None = None
    progress: Callable[[int, int | None], None] = lambda step, layer: None
    #: "ref"/"cand" -> the ops that side declares it lacks: nothing is asked of any side for them (the golden
    #: is never asked to compute what no side can be compared with)
    lacks: dict[str, frozenset[str]] = field(default_factory=dict)
    ties: list[dict] = field(default_factory=list)
    tied_positions: dict[int, int] = field(default_factory=dict)  # position -> layer of its tie
    prefill_noise: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # tap -> reference (rel_l2, max_abs) at step 0
    router_ok: dict[tuple[int, int], bool] = field(default_factory=dict)  # (step, layer) -> router logits within noise
    _router_logits: dict[int, tuple] = field(default_factory=dict)  # layer -> (gold, ref, cand) of this step
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)  # the candidate's whole cache after the last step

    def run(self) -> Iterator[TapResult]:
        sides = (self.gold, self.ref, self.cand)
        for s in range(self.schedule.total):
            info = self.schedule.get(s)
            router: _Router | None = None
            layer = -1
            for spec in step_taps(self.cfg, len(info.token_ids), info.tokens, info.positions[0][-1] + 1):
                if spec.layer is not None and spec.layer != layer:
                    layer = spec.layer
                    self.progress(s, layer)
                declared = [role for role in ("ref", "cand") if spec.op in self.lacks.get(role, ())]
                if declared == ["cand"] and spec.op in ROUTER_OPS:  # the reference's own routing ties still count
                    res, router = self.tap(
                        info, spec, self.gold.take(s, spec.name), _whole(self.ref.take(s, spec.name)), None, router
                    )
                    yield res
                    continue
                if declared:
                    lacking = " and the ".join({"ref": "reference", "cand": "candidate"}[r] for r in declared)
                    yield TapResult(
                        step=s,
                        name=spec.name,
                        layer=spec.layer,
                        op=spec.op,
                        numel=spec.numel,
                        status="not_compared",
                        reason=f"the {lacking} lacks it",
                    )
                    continue
                g, r, c = (side.take(s, spec.name) for side in sides)
                ranks = c if isinstance(c, Gathered) else None
                r, c = _whole(r), _whole(c)
                if any(isinstance(v, QueryRows) for v in (r, c)):  # a side computed some rows only
                    rows = next(v.positions for v in (r, c) if isinstance(v, QueryRows))
                    pick = lambda v, rows=rows: pick_rows(info, spec, rows, v)  # noqa: E731
                    res, router = self.tap(*_rows_of_step(info, spec, rows), *map(pick, (g, r, c)), router, ranks, pick)
                    _to_step_rows(res, info, rows)
                else:
                    res, router = self.tap(info, spec, g, r, c, router, ranks)
                if ranks is not None and "ranks" not in res.extra:  # expert ids and weights: judged by sets
                    res = _copies_differ(res, ranks)
                elif ranks is not None and "copy" in res.extra["ranks"]:  # the window keeps the copy judged divergent
                    c = ranks.variant(next(p for p in ranks.parts if p.rank == res.extra["ranks"]["copy"]))
                if self.window is not None:
                    self.window.add(info, spec, res.divergent, {"gold": g, "ref": r, "cand": c})
                yield res
            for side in sides:
                side.end_step(s)
            self.progress(s, None)

    def tap(
        self,
        info: StepInfo,
        spec: TapSpec,
        g: Value | None,
        r: Value | None,
        c: Value | None,
        router: _Router | None,
        ranks: Gathered | None = None,
        pick: Callable[[Value], torch.Tensor] | None = None,
    ) -> tuple[TapResult, _Router | None]:
        """The verdict on one tap; `ranks`, when the candidate's tap was gathered from the ranks of a
        tensor-parallel run (`c` is its whole value), traces a divergence back to a rank; `pick` takes the rows
        compared from a rank's copy when a side holds some token rows only."""
        s, name = info.step, spec.name
        base = dict(step=s, name=name, layer=spec.layer, op=spec.op, numel=spec.numel)
        lacking = [role for role, v in (("fp64 golden", g), ("reference", r), ("candidate", c)) if v is None]
        if lacking == ["candidate"] and spec.op in ROUTER_OPS:
            if spec.integer:
                return self.expert_ids(info, spec, g, r, None, base)
            self._router_logits[spec.layer] = (g, r, None)
        if lacking:
            return TapResult(status="not_compared", reason=f"the {' and the '.join(lacking)} lacks it", **base), router
        slots, problem, changed = None, "", []
        if spec.op in CACHE_OPS:
            if s > 0 and isinstance(c, CacheSlots) and c.full is None:
                self.schedule.slots_only.set()  # no whole cache of another side can be of use
            problem, changed = self._cache_changes(info, spec, c)
            if s > 0 and not problem:  # a decode step: compare the slots it wrote, and any older one it changed
                slots = sorted(set(info.positions[0]) | set(changed))
                fulls = [_full(v) for v in (g, r, c)]
                if changed and any(f is None for f in fulls):
                    problem = (
                        f"{_changed_words(info, changed)}, and they cannot be judged: a side lacks the whole "
                        "cache at this step"
                    )
                else:
                    g, r, c = (
                        f[:, :, slots] if changed else written_slots(v, info.positions[0])
                        for f, v in zip(fulls, (g, r, c))
                    )
                    base["numel"] = g.numel()
            if problem:
                return TapResult(status="divergent", reason=problem, **base), router
        t_positions = info.positions  # the position of each T index, per batch row (the rows compared)
        gshape = g.view_shape if isinstance(g, RowBlocks) else tuple(g.shape)
        for who, t in (("reference", r), ("candidate", c)):
            if tuple(t.shape) != gshape:
                status = "divergent" if who == "candidate" else "not_compared"
                return TapResult(
                    status=status, reason=f"{who} shape {list(t.shape)} vs fp64 {list(gshape)}", **base
                ), router
        if spec.integer:
            return self.expert_ids(info, spec, g, r, c, base)
        if spec.op == "moe.topk_weights" and router is not None:
            g, r, c = (_sort_by_ids(t, ids) for t, ids in zip((g, r, c), router.ids))
            return self.values(info, spec, g, r, c, base, token_ok=router.agree, positions=t_positions), None
        res = self.values(info, spec, g, r, c, base, positions=t_positions, slots=slots)
        if slots is not None and res.worst:
            res.worst["key"] = slots[res.worst.get("key", 0)]
        if changed:
            res.extra["changed_slots"] = changed
            if res.divergent:
                res.reason = f"{_changed_words(info, changed)}, and they now differ from fp64; {res.reason}"
        if ranks is not None:

            def compared(v: Value) -> torch.Tensor:  # a rank's variant of the tap, as c is compared
                if slots is not None:
                    v = _full(v)[:, :, slots] if changed else written_slots(v, info.positions[0])
                return pick(v) if pick is not None else v

            res = self.trace_ranks(info, spec, res, g, r, c, ranks, compared)
        if spec.op == "moe.router_logits":
            self.router_ok[(s, spec.layer)] = res.status == "ok"
            self._router_logits[spec.layer] = (g, r, c)
        return res, router

    def trace_ranks(
        self,
        info: StepInfo,
        spec: TapSpec,
        res: TapResult,
        g,
        r: torch.Tensor,
        c: torch.Tensor,
        ranks: Gathered,
        compared: Callable[[Value], torch.Tensor],
    ) -> TapResult:
        """The verdict `res` on a gathered tap, traced back to the ranks: copies of one slice (or of a replicated
        tap) that differ are each judged as the tap their rank holds, and a rank whose copy alone leaves the
        noise floor is named; a divergence confined to one rank's slice names the rank and the slice; a
        divergent partial sum says so, and which rank's addend the error is a multiple of."""
        base = dict(step=info.step, name=spec.name, layer=spec.layer, op=spec.op, numel=res.numel)
        traced: dict = {"kind": ranks.kind, "world_size": len(ranks.parts)}
        res.extra["ranks"] = traced
        differ = ranks.disagreeing()
        if differ:
            verdicts = {lowest: res.divergent for lowest, _ in differ}
            judged = {}
            for _, part in differ:
                judged[part.rank] = self.values(info, spec, g, r, compared(ranks.variant(part)), dict(base))
                verdicts[part.rank] = judged[part.rank].divergent
            off = sorted(k for k, v in verdicts.items() if v)
            fine = sorted(k for k, v in verdicts.items() if not v)
            traced["copies_differ"] = sorted(verdicts)
            if off and fine:
                traced["rank"] = off
                worst = res
                if not res.divergent:
                    worst, traced["copy"] = judged[off[0]], off[0]
                shard = differ[0][1].shard
                of = (
                    f" of {slice_words(spec.axes[shard.axis], shard.start, shard.stop, self.cfg.head_dim)}"
                    if shard.kind == "split"
                    else ""
                )
                worst.reason = (
                    f"the ranks' copies{of} differ: rank {_ranks(off)}'s leaves the noise floor ({worst.reason}) "
                    f"while rank {_ranks(fine)}'s is within it"
                )
                worst.extra["ranks"] = traced
                return worst
        if not res.divergent or ranks.kind == "replicated" or spec.integer:
            return res
        if isinstance(g, RowBlocks) and math.prod(g.view_shape) > BLOCK_ELEMENTS:
            return res  # a golden too large to hold whole: the tap's verdict stands, untraced
        gold = value_of(g)
        if ranks.kind == "partial":
            res.reason += f"; the sum of the {len(ranks.parts)} ranks' partial sums is off"
            fit = self._partial_fault(
                info, spec, g, r, c, gold, [Part(p.rank, p.shard, compared(p.value)) for p in ranks.parts], base
            )
            if fit is not None:
                rank, a, cos = fit
                traced.update(rank=[rank], factor=a, cosine=cos)
                res.reason += f": the error is {a:.3g} x rank {rank}'s partial (cosine {cos:.4f})" + (
                    f", as if that partial were {1 / (1 - a):.3g}x what the sum needs" if abs(1 - a) > 1e-3 else ""
                )
            return res
        axis = ranks.axis
        off = []
        for group in ranks.groups():
            start, stop = group[0].shard.start, group[0].shard.stop
            narrow = [t.narrow(axis, start, stop - start) for t in (gold, r, c)]
            if self.values(info, spec, *narrow, dict(base)).divergent:
                off.append(group)
        if len(off) == 1 and len(ranks.groups()) > 1:
            held = [p.rank for p in off[0]]
            shard = off[0][0].shard
            words = slice_words(spec.axes[axis], shard.start, shard.stop, self.cfg.head_dim)
            traced.update(rank=held, slice=words, axis=axis, start=shard.start, stop=shard.stop)
            res.reason += f"; confined to rank {_ranks(held)}'s slice ({words})"
        return res

    def _cache_changes(self, info: StepInfo, spec: TapSpec, c: Value) -> tuple[str, list[int]]:
        """(what is wrong with where the candidate wrote its cache, the older slots it changed since the last
        step). Changed slots are then judged against fp64 like the new ones: an implementation that
        recomputes its whole prefix each step changes old slots within the noise, a ring that wraps or an
        index off by one overwrites them with another token's entry."""
        positions = info.positions[0]
        if isinstance(c, CacheSlots) and c.positions != positions:
            return (
                f"the step wrote cache slots at positions {c.positions[:8]}, but its tokens are at {positions[:8]}",
                [],
            )
        full = _full(c)
        if full is None:
            return "", []
        previous = self._cache.get(spec.name)
        self._cache[spec.name] = full
        if previous is None or full.shape[2] < previous.shape[2] or full.shape[:2] != previous.shape[:2]:
            return "", []
        return "", changed_slots(previous, full[:, :, : previous.shape[2]])

    def _partial_fault(self, info, spec, g, r, c, gold, parts: list[Part], base: dict):
        """(rank, factor, cosine) of the one rank whose addend, taken out a fitted number of times, leaves the
        sum within the noise floor (a scaled, dropped or doubled partial); None when no rank's does, or two do."""
        fits = []
        for rank, a, cos in partial_fits(c.double() - gold.double(), parts):
            value = next(p.value for p in parts if p.rank == rank)
            mended = (c.double() - a * value.double()).to(c.dtype)
            if not self.values(info, spec, g, r, mended, dict(base)).divergent:
                fits.append((rank, a, cos))
        return fits[0] if len(fits) == 1 else None

    def values(
        self,
        info: StepInfo,
        spec: TapSpec,
        g,
        r,
        c,
        base: dict,
        token_ok: torch.Tensor | None = None,
        positions: list[list[int]] | None = None,
        slots: list[int] | None = None,
    ) -> TapResult:
        reasons, extra = [], {}
        keep = None
        shape = g.view_shape if isinstance(g, RowBlocks) else tuple(g.shape)
        if token_ok is not None or self._tied(spec):
            keep = self._exclusions(info, spec, torch.ones(shape, dtype=torch.bool), extra)
            if token_ok is not None:
                keep = keep & token_ok[..., None]
        # One fused pass: where the golden is not finite, a side masks an attention score, or either side
        # is not finite (the reference then sets no floor and the candidate is not judged), nothing is compared.
        scores, logits = spec.op == "attn_scores", spec.op == "logits"
        blocked = isinstance(g, RowBlocks)
        counts: dict[str, list[dict]] = {"cand": [], "ref": []}

        def count_rows(gb: torch.Tensor, rb: torch.Tensor, cb: torch.Tensor) -> None:
            cand, ref = logits_counts(gb, cb, rb)
            counts["cand"].append(cand)
            counts["ref"].append(ref)

        if blocked:
            te = blocked_errors(g, r, c, scores, keep, count_rows if logits else None, row=shape[-1])
        else:
            te = tap_errors(g, r, c, scores=scores, keep=keep, row=shape[-1])
        if te.mask_diff:
            reasons.append(f"mask pattern differs from fp64 at {te.mask_diff} entries")
        if te.nonfinite["cand"]:
            reasons.append(f"{te.nonfinite['cand']} NaN/inf where fp64 is finite")
        count, sc, sr = te.count, te.cand, te.ref
        gmax = te.gold_max if count else 0.0
        # A decode step has one token: pool the reference's noise with the prefill's, where the same op
        # saw many tokens, so that a lucky small sample does not set the floor.
        noise = self.prefill_noise.setdefault(spec.name, (sr.rel_l2, sr.max_abs))
        tol = tolerance(self.dtype, max(sr.rel_l2, noise[0]), max(sr.max_abs, noise[1]), gmax, count)
        excess = tol.excess(sc.rel_l2, sc.max_abs)
        if excess > 1:
            which = "rel. L2" if sc.rel_l2 / tol.rel >= sc.max_abs / tol.abs_ else "max |err|"
            reasons.append(f"{which} {excess:.3g}x over the {dtype_name(self.dtype)} noise floor")
        if te.rows is not None and te.rows.shape[1] > 1:
            ref_rel = max(sr.rel_l2, noise[0])
            rows = judge_rows(te.rows[4:], ref_rel, self.dtype, shape, spec.axes, positions, slots)
            if rows is not None:
                extra["rows"] = rows
                reasons.append(rows_reason(rows, dtype_name(self.dtype)))
                excess = max(excess, rows["worst_excess"])
        if not reasons and te.rows is not None:
            extra["signed"] = signed_stats(te.rows[:4], count, te.gold_norm, self.dtype, c.dtype == r.dtype)
        if keep is not None or te.nonfinite["cand"]:
            # the reference's error over every element, whatever the candidate left out: what
            # DiffResult.suspect_reference judges, so that its answer does not depend on the candidate
            alone = blocked_errors(g, r, r, scores, None) if blocked else tap_errors(g, r, r, scores=scores)
            extra["ref_rel_l2_alone"] = alone.ref.rel_l2
        if logits and count:
            if not counts["cand"]:
                count_rows(g, r, c)
            extra.update(agreement(counts["cand"]))
            extra["reference"] = agreement(counts["ref"])  # what a clean run of this dtype reaches on these tokens
        # The share of elements over the per-element limit takes a second pass, only when some element is.
        limit = max(sr.max_abs, tol.abs_ / ELEMENT_FACTOR)
        over = 0
        if count and sc.max_abs > limit:
            over = (
                blocked_count_over(g, r, c, limit, scores, keep)
                if blocked
                else count_over(g, r, c, limit, scores=scores, keep=keep)
            )
        eps = torch.finfo(self.dtype).eps
        return TapResult(
            status="divergent" if reasons else "ok",
            reason="; ".join(reasons),
            max_abs=sc.max_abs,
            rel_l2=sc.rel_l2,
            cosine=cosine(te.dot, te.gold_norm, sc.norm),
            mismatch=over / count if count else 0.0,
            ref_max_abs=sr.max_abs,
            ref_rel_l2=sr.rel_l2,
            tol_rel=tol.rel,
            tol_abs=tol.abs_,
            excess=excess,
            diff_ulps=ratio(te.diff_norm, te.gold_norm) / eps,
            nonfinite=te.nonfinite,
            worst=_with_position(
                worst_coordinate(sc.argmax, shape, spec.axes, info.step, self.cfg.head_dim), positions
            ),
            extra=extra,
            **base,
        )

    def expert_ids(self, info: StepInfo, spec: TapSpec, g, r, c, base: dict) -> tuple[TapResult, _Router | None]:
        """Sets per token; a changed set is a routing tie when the router logits are within the noise and the
        fp64 margin between the k-th and (k+1)-th expert is within twice the sides' router-logit error at
        that token, else a divergence. The reference's own flips at a near tie are ties too
        (`reference_ties`): its error jumps from there on and would widen every later tolerance. `c` is
        None for a candidate without expert ids: then only the reference's ties are looked for."""
        k, layer = self.cfg.num_experts_per_tok, spec.layer
        gold_logits, *sides = self._router_logits.get(layer, (None, None, None))
        if gold_logits is None:
            lg = torch.zeros((*g.shape[:-1], k + 1), dtype=torch.float64)
            sides = []
        else:
            lg = gold_logits.double()
        margin = router_margin(lg, k)
        ref_same = same_sets(r, g)
        ref_tie, ref_noise = reference_ties(lg, sides[0] if sides else None, margin, ref_same)
        for b, t in ref_tie.nonzero().tolist():
            self._record_tie(info, layer, (b, t), margin, ref_noise, gold=g, chosen=("ref", r))
        if c is None:
            return TapResult(status="not_compared", reason="the candidate lacks it", **base), None
        # Only a candidate whose router logits are within the noise can tie; after a divergence a changed
        # choice is a consequence, not a tie.
        noise = torch.zeros(lg.shape[:-1], dtype=torch.float64)
        for logits in sides:
            if logits is not None:
                noise = torch.maximum(noise, (logits.double() - lg).abs().amax(-1))
        if not self.router_ok.get((info.step, layer), False):
            noise.zero_()
        cand_same = same_sets(c, g)
        changed = ~cand_same
        tie = changed & (margin <= 2 * noise)
        wrong = changed & ~tie
        extra = {"ref_experts_changed": int((~ref_same).sum())}  # for DiffResult.suspect_reference
        for b, t in tie.nonzero().tolist():
            self._record_tie(info, layer, (b, t), margin, float(noise[b, t]), gold=g, chosen=("cand", c))
        if bool(tie.any() | ref_tie.any()):
            extra["routing_ties"] = int(tie.sum() + ref_tie.sum())
        res = TapResult(
            status="divergent" if bool(wrong.any()) else "ok",
            extra=extra,
            **base,
            mismatch=float(changed.double().mean()),
        )
        if res.divergent:
            b, t = wrong.nonzero()[0].tolist()
            res.reason = (
                f"expert choice differs for {int(wrong.sum())} tokens beyond router noise "
                f"(token {t}: margin {float(margin[b, t]):.3g} > 2 x logit error {float(noise[b, t]):.3g})"
            )
            res.worst = {"step": info.step, "batch": b, "token": t}
            window = max(2 * float(noise[b, t]), torch.finfo(self.dtype).eps * float(lg[b, t].abs().max()))
            res.excess = float(margin[b, t]) / window if window > 0 else float(margin[b, t])
        return res, _Router((g, r, c), cand_same & ref_same)

    def _record_tie(
        self,
        info: StepInfo,
        layer: int,
        at: tuple[int, int],
        margin: torch.Tensor,
        noise: float,
        *,
        gold: torch.Tensor,
        chosen: tuple[str, torch.Tensor],
    ) -> None:
        """Note a routing tie of one side ('ref' or 'cand': whose choice changed) at (batch, token) and take
        its position out of every later comparison."""
        (b, t), (side, ids) = at, chosen
        pos = info.positions[b][t]
        self.tied_positions.setdefault(pos, layer)
        self.ties.append(
            {
                "step": info.step,
                "layer": layer,
                "token": t,
                "position": pos,
                "side": side,
                "margin": float(margin[b, t]),
                "noise": noise,
                "gold": gold[b, t].tolist(),
                side: ids[b, t].tolist(),
            }
        )

    def _tied(self, spec: TapSpec) -> set[int]:
        """Positions whose expert choice was a routing tie before this tap."""
        layer = spec.layer if spec.layer is not None else self.cfg.num_hidden_layers
        return {p for p, at in self.tied_positions.items() if at < layer or (at == layer and spec.op in _AFTER_ROUTING)}

    def _exclusions(self, info: StepInfo, spec: TapSpec, valid: torch.Tensor, extra: dict) -> torch.Tensor:
        """Leave out the positions whose expert choice was a routing tie at or before this layer."""
        tied = self._tied(spec)
        if not tied:
            return valid
        keep = valid.clone()
        for axis_name, index in (
            ("T", info.positions[0]),
            ("S", range(valid.shape[spec.axes.index("S")]) if "S" in spec.axes else []),
        ):
            if axis_name in spec.axes:
                ax = spec.axes.index(axis_name)
                drop = torch.tensor([p in tied for p in index])
                shape = [1] * valid.dim()
                shape[ax] = -1
                keep &= ~drop.view(shape)
        extra["excluded_positions"] = sorted(tied)
        return keep


def reference_ties(
    gold_logits: torch.Tensor, ref_logits: torch.Tensor | None, margin: torch.Tensor, ref_same: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """(bool [B,T], noise): tokens where the reference chose other experts than fp64 within its own router
    noise, from the ids and margins alone: fp64's k-th/(k+1)-th margin [B,T] is at most twice the reference's
    largest router-logit error [B,T,E] over the tokens it routes as fp64 does (ref_same [B,T]), so a broken
    token's own error does not excuse it."""
    if ref_logits is None or bool(ref_same.all()) or not bool(ref_same.any()):
        return torch.zeros_like(ref_same), 0.0
    err = (ref_logits.double() - gold_logits).abs().amax(-1)
    noise = float(err[ref_same].max())
    return ~ref_same & (margin <= 2 * noise), noise


_AFTER_ROUTING = frozenset({"moe.topk_weights", "mlp.out", "resid_out"})
#: what the reference's routing ties are judged from, asked of the golden and the reference even when the
#: candidate lacks them
ROUTER_OPS = frozenset({"moe.router_logits", "moe.topk_ids"})


def _sort_by_ids(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """topk_weights [B,T,k] reordered by expert id, so sides that list the same experts align."""
    return t.gather(-1, ids.argsort(-1))


def _copies_differ(res: TapResult, ranks: Gathered) -> TapResult:
    """A tap judged without `values` (expert ids, their weights), its ranks' copies compared bitwise only: copies
    that should be equal and are not make it divergent, naming the ranks."""
    differ = ranks.disagreeing()
    res.extra["ranks"] = {"kind": ranks.kind, "world_size": len(ranks.parts)}
    if differ:
        res.extra["ranks"]["copies_differ"] = sorted({r for lowest, p in differ for r in (lowest, p.rank)})
        words = "; ".join(f"rank {p.rank}'s copy differs from rank {lowest}'s" for lowest, p in differ)
        res.status, res.reason = "divergent", "; ".join(filter(None, [res.reason, words]))
    return res


def _whole(v):
    """A side's value with a tensor-parallel gathering's trace left out (`Gathered.value`)."""
    return v.value if isinstance(v, Gathered) else v


def _ranks(ranks: list[int]) -> str:
    return " and ".join(map(str, ranks))


def _full(v: Value) -> torch.Tensor | None:
    """The whole cache [B,nKV,S,D] a side shows, or None when it wrote only slots."""
    return v.full if isinstance(v, CacheSlots) else v


def _changed_words(info: StepInfo, changed: list[int]) -> str:
    p = info.positions[0]
    return (
        f"step {info.step} changed cache slot(s) {changed[:8]} written by earlier steps (it writes position"
        f"{'s' if len(p) > 1 else ''} {p[0]}{f'..{p[-1]}' if len(p) > 1 else ''})"
    )


def changed_slots(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Slots (the S axis of [B,nKV,S,D]) whose bits differ: bitwise, so an unchanged NaN is unchanged."""
    if before.dtype != after.dtype:
        return list(range(before.shape[2]))
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[before.element_size()]
    a, b = before.contiguous().view(bits), after.contiguous().view(bits)
    if torch.equal(a, b):
        return []
    return (a != b).any(-1).any(1).any(0).nonzero().flatten().tolist()


def pick_rows(info: StepInfo, spec: TapSpec, rows: list[int], v: Value) -> torch.Tensor:
    """A side's rows of the token (T) axis at positions `rows`: the rows a side computed or kept (`QueryRows`: an
    engine's attention rows, a serving engine's sampled logits, a prefill that started at a cached prefix),
    taken from any side."""
    axis = spec.axes.index("T")
    if isinstance(v, QueryRows):
        if v.positions == rows:
            return v.values
        return v.values.index_select(axis, torch.tensor([v.positions.index(p) for p in rows]))
    index = [p - info.positions[0][0] for p in rows]
    if isinstance(v, RowBlocks):
        return torch.cat([v.take(i, i + 1) for i in index], dim=v.axis)
    return v.index_select(axis, torch.tensor(index))


def _rows_of_step(info: StepInfo, spec: TapSpec, rows: list[int]) -> tuple[StepInfo, TapSpec]:
    """The step and the tap as if the step had only the tokens at `rows`."""
    index = [p - info.positions[0][0] for p in rows]
    step = replace(info, token_ids=[[info.token_ids[0][i] for i in index]], positions=[list(rows)])
    shape = list(spec.shape)
    shape[spec.axes.index("T")] = len(rows)
    return step, replace(spec, shape=tuple(shape))


def _to_step_rows(res: TapResult, info: StepInfo, rows: list[int]) -> None:
    """A result over some rows told in the step's own token numbering, with the rows it compared."""
    if res.worst and "token" in res.worst:
        res.worst["token"] = rows[res.worst["token"]] - info.positions[0][0]
    if rows != info.positions[0]:
        res.extra["positions"] = rows if len(rows) <= 8 else f"{rows[0]}..{rows[-1]} ({len(rows)} rows)"


def judge_rows(
    sums: torch.Tensor,
    ref_rel_l2: float,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    positions: list[list[int]] | None,
    slots: list[int] | None,
) -> dict | None:
    """The row rule (`noise.row_excess`) over a tap's rows (every axis but the last): None when no row leaves
    the noise, else how many do, the worst excess, and the first row by position then head, with its
    position as a position (a decode step's query row is its absolute position, a cache slot its own)."""
    excess = row_excess(sums, ref_rel_l2, dtype)
    with np.errstate(invalid="ignore"):
        over = np.flatnonzero(excess > 1)
    if over.size == 0:
        return None
    coords, rem = {}, over
    for size, axis in reversed(list(zip(shape[:-1], axes[:-1]))):
        coords[axis], rem = rem % size, rem // size
    none = np.zeros_like(over)
    if "T" in coords and positions is not None:
        pos = np.asarray(positions)[coords.get("B", none), coords["T"]]
    elif "S" in coords:
        pos = np.asarray(slots)[coords["S"]] if slots is not None else coords["S"]
    else:
        pos = none
    head = coords.get("nH", coords.get("nKV", none))
    first = int(np.argmin(pos * (int(head.max()) + 1) + head))
    where = {"position": int(pos[first])} if "T" in coords or "S" in coords else {}
    if "nH" in coords or "nKV" in coords:
        where["head"] = int(head[first])
    return {
        "over": int(over.size),
        "judged": int(np.isfinite(excess).sum()),
        "first": where,
        "first_excess": float(excess[over[first]]),
        "worst_excess": float(excess[over].max()),
    }


def rows_reason(rows: dict, dtype: str) -> str:
    where = ", ".join(f"{k} {v}" for k, v in rows["first"].items()) or "a row"
    return (
        f"{rows['over']} of {rows['judged']} rows over their own {dtype} noise floor, the first at {where} "
        f"({rows['first_excess']:.3g}x; worst {rows['worst_excess']:.3g}x)"
    )


def _with_position(worst: dict, positions: list[list[int]] | None) -> dict:
    """The worst element's token also as its position: at a decode step, token 0 is position 2148."""
    if "token" in worst and positions is not None:
        worst["position"] = positions[worst.get("batch", 0)][worst["token"]]
    return worst
