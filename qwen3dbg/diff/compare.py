"""Streaming comparison of a candidate's taps with the reference's, both judged against the fp64 golden.

Taps are read one at a time in forward order (steps, layers, schema order): memory holds one tap of
each side, never a whole store. The rule itself is in `noise`; docs/differ.md explains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from qwen3dbg.config import Qwen3Config
from qwen3dbg.diff.fused import count_over, tap_errors
from qwen3dbg.diff.metrics import cosine, logits_agreement, ratio, router_margin, same_sets, worst_coordinate
from qwen3dbg.diff.noise import ELEMENT_FACTOR, tolerance
from qwen3dbg.diff.result import TapResult
from qwen3dbg.dtypes import dtype_name
from qwen3dbg.store import StepInfo, TapStore
from qwen3dbg.taps import TapSpec, step_taps, tap_name

@dataclass
class _Router:
    """What a MoE layer's topk_ids comparison leaves for its topk_weights: ids of each side, tokens to compare."""

    ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gold, ref, cand [B,T,k]
    agree: torch.Tensor  # bool [B,T]


@dataclass
class Comparison:
    """State of one streaming comparison: routing ties found so far and the positions they take out."""

    gold: TapStore
    ref: TapStore
    cand: TapStore
    cfg: Qwen3Config
    dtype: torch.dtype
    ties: list[dict] = field(default_factory=list)
    tied_positions: dict[int, int] = field(default_factory=dict)  # position -> layer of its tie
    prefill_noise: dict[str, tuple[float, float]] = field(default_factory=dict)  # tap -> reference (rel_l2, max_abs) at step 0
    router_ok: dict[tuple[int, int], bool] = field(default_factory=dict)  # (step, layer) -> router logits within noise

    def run(self) -> Iterator[TapResult]:
        cache = 0
        for info in self.gold.steps:
            cache += info.tokens
            router: _Router | None = None
            for spec in step_taps(self.cfg, len(info.token_ids), info.tokens, cache):
                res, router = self.tap(info, spec, router)
                yield res

    def tap(self, info: StepInfo, spec: TapSpec, router: _Router | None) -> tuple[TapResult, _Router | None]:
        s, name = info.step, spec.name
        base = dict(step=s, name=name, layer=spec.layer, op=spec.op, numel=spec.numel)
        lacking = [role for role, st in (("fp64 golden", self.gold), ("reference", self.ref), ("candidate", self.cand))
                   if not st.has(s, name)]
        if lacking:
            return TapResult(status="not_compared", reason=f"the {' and the '.join(lacking)} lacks it", **base), router
        g, r, c = self.gold.get(s, name), self.ref.get(s, name), self.cand.get(s, name)
        for who, t in (("reference", r), ("candidate", c)):
            if tuple(t.shape) != tuple(g.shape):
                status = "divergent" if who == "candidate" else "not_compared"
                return TapResult(status=status, reason=f"{who} shape {list(t.shape)} vs fp64 {list(g.shape)}", **base), router
        if spec.integer:
            return self.expert_ids(info, spec, g, r, c, base)
        if spec.op == "moe.topk_weights" and router is not None:
            g, r, c = (_sort_by_ids(t, ids) for t, ids in zip((g, r, c), router.ids))
            return self.values(info, spec, g, r, c, base, token_ok=router.agree), None
        res = self.values(info, spec, g, r, c, base)
        if spec.op == "moe.router_logits":
            self.router_ok[(s, spec.layer)] = res.status == "ok"
        return res, router

    def values(self, info: StepInfo, spec: TapSpec, g, r, c, base: dict, token_ok: torch.Tensor | None = None) -> TapResult:
        reasons, extra = [], {}
        keep = None
        if token_ok is not None or self._tied(spec):
            keep = self._exclusions(info, spec, torch.ones(g.shape, dtype=torch.bool), extra)
            if token_ok is not None:
                keep = keep & token_ok[..., None]
        # One fused pass: where the golden is not finite, a side masks an attention score, or either side
        # is not finite (the reference then sets no floor and the candidate is not judged), nothing is compared.
        scores = spec.op == "attn_scores"
        te = tap_errors(g, r, c, scores=scores, keep=keep)
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
        if spec.op == "logits" and count:
            extra.update(logits_agreement(c, g))
        # The share of elements over the per-element limit takes a second pass, only when some element is.
        limit = max(sr.max_abs, tol.abs_ / ELEMENT_FACTOR)
        mismatch = count_over(g, r, c, limit, scores=scores, keep=keep) / count if count and sc.max_abs > limit else 0.0
        eps = torch.finfo(self.dtype).eps
        return TapResult(
            status="divergent" if reasons else "ok", reason="; ".join(reasons), max_abs=sc.max_abs,
            rel_l2=sc.rel_l2, cosine=cosine(te.dot, te.gold_norm, sc.norm), mismatch=mismatch,
            ref_max_abs=sr.max_abs, ref_rel_l2=sr.rel_l2, tol_rel=tol.rel, tol_abs=tol.abs_, excess=excess,
            diff_ulps=ratio(te.diff_norm, te.gold_norm) / eps, nonfinite=te.nonfinite,
            worst=worst_coordinate(sc.argmax, spec.shape, spec.axes, info.step, self.cfg.head_dim), extra=extra, **base)

    def expert_ids(self, info: StepInfo, spec: TapSpec, g, r, c, base: dict) -> tuple[TapResult, _Router]:
        """Sets per token; a changed set is a routing tie when the router logits are within the noise and the
        fp64 margin between the k-th and (k+1)-th expert is within twice the sides' router-logit error at
        that token, else a divergence."""
        k, layer = self.cfg.num_experts_per_tok, spec.layer
        logits_name = tap_name("moe.router_logits", layer)
        lg = self.gold.get(info.step, logits_name).double()
        # Only a candidate whose router logits are within the noise can tie; after a divergence a changed
        # choice is a consequence, not a tie.
        noise = torch.zeros(lg.shape[:-1], dtype=torch.float64)
        for st in (self.ref, self.cand):
            if st.has(info.step, logits_name):
                noise = torch.maximum(noise, (st.get(info.step, logits_name).double() - lg).abs().amax(-1))
        if not self.router_ok.get((info.step, layer), False):
            noise.zero_()
        margin = router_margin(lg, k)
        cand_same, ref_same = same_sets(c, g), same_sets(r, g)
        changed = ~cand_same
        tie = changed & (margin <= 2 * noise)
        wrong = changed & ~tie
        extra = {}
        for b, t in tie.nonzero().tolist():
            pos = info.positions[b][t]
            self.tied_positions.setdefault(pos, layer)
            self.ties.append({"step": info.step, "layer": layer, "token": t, "position": pos,
                              "margin": float(margin[b, t]), "noise": float(noise[b, t]),
                              "gold": g[b, t].tolist(), "cand": c[b, t].tolist()})
        if bool(tie.any()):
            extra["routing_ties"] = int(tie.sum())
        res = TapResult(status="divergent" if bool(wrong.any()) else "ok", extra=extra, **base,
                        mismatch=float(changed.double().mean()))
        if res.divergent:
            b, t = wrong.nonzero()[0].tolist()
            res.reason = (f"expert choice differs for {int(wrong.sum())} tokens beyond router noise "
                          f"(token {t}: margin {float(margin[b, t]):.3g} > 2 x logit error {float(noise[b, t]):.3g})")
            res.worst = {"step": info.step, "batch": b, "token": t}
            window = max(2 * float(noise[b, t]), torch.finfo(self.dtype).eps * float(lg[b, t].abs().max()))
            res.excess = float(margin[b, t]) / window if window > 0 else float(margin[b, t])
        return res, _Router((g, r, c), cand_same & ref_same)

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
        for axis_name, index in (("T", info.positions[0]), ("S", range(valid.shape[spec.axes.index("S")]) if "S" in spec.axes else [])):
            if axis_name in spec.axes:
                ax = spec.axes.index(axis_name)
                drop = torch.tensor([p in tied for p in index])
                shape = [1] * valid.dim()
                shape[ax] = -1
                keep &= ~drop.view(shape)
        extra["excluded_positions"] = sorted(tied)
        return keep


_AFTER_ROUTING = frozenset({"moe.topk_weights", "mlp.out", "resid_out"})


def _sort_by_ids(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """topk_weights [B,T,k] reordered by expert id, so sides that list the same experts align."""
    return t.gather(-1, ids.argsort(-1))
