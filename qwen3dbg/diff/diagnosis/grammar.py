"""The grammar of edits: kinds nobody listed, found by composing small edits of the reference's computation at
the first divergent op, scored by fit and simplicity.

An `Edit` turns a replay of the op into another: an index map on one axis of its output (shift, reverse, swap
halves, roll, heads interleaved instead of in blocks, a permutation fitted from the data), a sign pattern or a
scale on one axis (one fitted scalar, signs on a half or a block, one factor per slice), or a structural edit
of the op itself (applied twice, skipped, run after its neighbour instead of before, RoPE at shifted
positions). The search replays the op the Qwen3 way and with each structural edit, from the candidate's own
operands through the reference's functions, fits each output edit on top of each replay, and states the
simplest edit (then the smallest residual) that passes `Site.explained`; two edits only when no single one
passes. The listed families run first, so an edit here is a kind they do not name; where an edit is a listed
kind after all, it reports that kind's id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qwen3dbg.diff.diagnosis.hypothesis import NORM_OPS, Hypothesis, on_rows, replay_floor, replay_op, replay_rows
from qwen3dbg.diff.diagnosis.replay import rms_norm, rope_angles, rotate
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
from qwen3dbg.diff.metrics import ranked, rel
from qwen3dbg.tapstore.schema import OPS_BY_NAME, inputs_of, parse_tap_name

#: the longest axis a permutation is fitted on (an n x n distance matrix over the tap)
PERMUTATION_AXIS = 64
#: ops whose output has its input's shape: an op that can be applied twice or skipped
_SAME_SHAPE = NORM_OPS + ("q_rope", "k_rope", "attn_probs")
#: ops that add their two inputs: a term may be scaled
_SUMS = ("resid_mid", "resid_out")
#: the longest shift fitted on an axis (besides the named shifts by one): |k| up to this, and half the axis
SHIFT_MAX = 16
#: projections replayed here (a MoE layer's mixture and the LM head are not): one matmul per token
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "mlp.up", "mlp.out", "moe.router_logits")
#: ops whose output mixes their operands' entries: an index map of an operand is no map of the output
_MIXING = ("attn_scores", "attn_out", "q_rope", "k_rope", "mlp.act") + _PROJECTIONS
#: neighbouring ops of one shape a port may run in the other order: (first, second) in Qwen3's order
_NEIGHBOURS = (("q_norm", "q_rope"), ("k_norm", "k_rope"))
#: ids for an edit that is a listed kind: (kind, op or group) -> catalogue id
_LISTED = {
    ("twice", "norm"): "norm_twice",
    ("skipped", "norm"): "norm_skipped",
    ("twice", "rope"): "rope_twice",
    ("skipped", "rope"): "rope_skipped",
    ("scalar", "embed"): "embed_scaled",
    ("scalar", "attn_scores"): "scores_scaled",
    ("rope_offset", "rope"): "rope_position_offset",
}


@dataclass(frozen=True)
class Edit:
    """One edit of the reference's computation: its grammar row (`kind`), what the candidate computes and the
    fix in words a porter acts on, how simple it is (`cost`: 1 for a named edit, more for one with fitted
    parameters), and its numbers."""

    kind: str
    words: str
    fix: str
    cost: int = 1
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Fit:
    """An edited replay: the edits (at most two), the replay and, for an edit fitted on some entries and
    judged on the others, the candidate's and the unedited replay's held-out entries it is judged on; for an
    edit replayed from the candidate's own operands, the candidate, the op replayed unedited from them and
    their noise floor (`replay_floor`; None: the tap's)."""

    edits: tuple[Edit, ...]
    replay: torch.Tensor
    cand: torch.Tensor | None = None
    unchanged: torch.Tensor | None = None
    floor: float | None = None

    @property
    def cost(self) -> int:
        return sum(e.cost for e in self.edits)


# ---- axes ------------------------------------------------------------------------------------------


def _axes(
    s: Site, shape: tuple[int, ...], tokens: bool, op: str | None = None
) -> list[tuple[int, str, tuple[int, ...]]]:
    """(dim, words, view shape) for each axis of the tap an edit may act on: `nH*D` as heads, head_dim and
    the channels together; the batch, top-k slots, axes of one element, and the tokens unless `tokens` (all
    of them held) left out."""
    view, names, flat = [], [], []
    op = op or s.op
    for d, (size, name) in enumerate(zip(shape, OPS_BY_NAME[op].axes)):
        if name in ("nH*D", "nKV*D"):
            view += [size // s.cfg.head_dim, s.cfg.head_dim]
            names += [name.split("*")[0], "D"]
            flat.append((d, "output channels", tuple(shape)))
        else:
            view.append(size)
            names.append(name)
    skip = ("B", "k") + (() if tokens else ("T",))
    split = [(d, _axis_words(op, n), tuple(view)) for d, n in enumerate(names) if n not in skip and view[d] > 1]
    return split + flat


def _axis_words(op: str, name: str) -> str:
    who = op.split("_")[0] if op[:2] in ("q_", "k_", "v_") else ""
    return {
        "T": "tokens",
        "S": "key positions" if op.startswith("attn_") else "cache positions",
        "nH": f"{who or 'query'} heads",
        "nKV": f"{who or 'kv'} heads",
        "D": "head_dim channels",
        "H": "hidden channels",
        "I": "intermediate channels",
        "E": "experts",
        "V": "vocabulary rows",
    }.get(name, name)


def _finite_mul(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """a * r where r is finite; a masked (-inf) entry stays masked."""
    return torch.where(torch.isfinite(r), a * r, r)


def _along(a: torch.Tensor, r: torch.Tensor, view: tuple[int, ...], d: int) -> torch.Tensor:
    """r scaled by a factor per slice of axis d of its view."""
    shape = [1] * len(view)
    shape[d] = view[d]
    return _finite_mul(a.reshape(shape), r.reshape(view)).reshape(r.shape)


# ---- output edits: fitted on top of a replay ---------------------------------------------------------


def _maps(n: int) -> list[tuple[str, str, torch.Tensor, str | None]]:
    """Named index maps of an axis of n: (name, words, idx: slot i holds the replay's slot idx[i], and for a
    shift what the slot left empty holds: "zero", or "kept" its own)."""
    ar = torch.arange(n)
    out = [("reverse", "in reverse order", ar.flip(0), None)]
    if n % 2 == 0:
        out.append(("swap_halves", "with their two halves swapped", (ar + n // 2) % n, None))
    return out + _shifts(n, (1, -1))


def _shifts(n: int, ks: tuple[int, ...]) -> list[tuple[str, str, torch.Tensor, str | None]]:
    """Rolls and shifts by each k, as `_maps` gives them."""
    ar, out = torch.arange(n), []
    for k in ks:
        out.append((f"roll{k:+d}", f"rolled by {k:+d} (slot i holds slot i{-k:+d}, wrapping)", (ar - k) % n, None))
        for edge in ("zero", "kept"):
            out.append(
                (f"shift{k:+d}", f"shifted by {k:+d} (slot i holds slot i{-k:+d}, the edge {edge})", ar - k, edge)
            )
    return out


def _fitted_shift(c: torch.Tensor, r: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The shift k (2 <= |k| <= SHIFT_MAX, at most half the axis) under which c's slots best match r's slots
    k before them, compared where both exist: () when the axis is too short for one."""
    n, best = c.shape[dim], (math.inf, 0)
    for k in (k * sign for k in range(2, min(n // 2, SHIFT_MAX) + 1) for sign in (1, -1)):
        lo = max(k, 0)
        best = min(best, (ranked(rel(c.narrow(dim, lo, n - abs(k)), r.narrow(dim, lo - k, n - abs(k)))), k))
    return (best[1],) if best[1] else ()


def _grouping(s: Site, n: int) -> list[tuple[str, str, torch.Tensor, None]]:
    """Heads grouped by modulo instead of division: for query heads, the interleaved order of GQA groups."""
    rep, groups = s.cfg.n_rep, s.cfg.num_key_value_heads
    if n != s.cfg.num_attention_heads or rep == 1:
        return []
    h = torch.arange(n)
    inter = (h % groups) * rep + h // groups  # slot h holds the blocked order's head
    return [
        (
            "interleaved",
            f"interleaved (head h in GQA group h % {groups}) where Qwen3 keeps them in blocks (group h // {rep})",
            inter,
            None,
        ),
        ("blocked", f"in blocks where Qwen3 interleaves them (group h % {groups})", inter.argsort(), None),
    ]


def _apply_map(r: torch.Tensor, dim: int, idx: torch.Tensor, edge: str | None) -> torch.Tensor:
    n = r.shape[dim]
    out = r.index_select(dim, idx.clamp(0, n - 1))
    if edge is not None:
        bad = ((idx < 0) | (idx >= n)).nonzero().flatten()
        sl = [slice(None)] * r.dim()
        sl[dim] = bad
        out[tuple(sl)] = 0 if edge == "zero" else r[tuple(sl)]
    return out


def _fitted_permutation(c: torch.Tensor, r: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The slot of r each slot of c is closest to along `dim`, when that is a permutation other than the identity."""
    n = c.shape[dim]
    if n > PERMUTATION_AXIS:
        return None
    cf, rf = (t.movedim(dim, 0).reshape(n, -1) for t in (c, r))
    ok = torch.isfinite(cf).all(0) & torch.isfinite(rf).all(0)
    if not bool(ok.any()):
        return None
    idx = torch.cdist(cf[:, ok], rf[:, ok]).argmin(1)
    return idx if bool((idx.sort().values == torch.arange(n)).all()) and bool((idx != torch.arange(n)).any()) else None


def _map_evidence(words: str, name: str, idx: torch.Tensor, edge: str | None) -> dict:
    """An index map's numbers: the whole map only for a short axis."""
    return {
        "axis": words,
        "map_name": name,
        "map": idx.tolist() if len(idx) <= PERMUTATION_AXIS else None,
        "edge": edge,
    }


def _index_maps(
    s: Site, c: torch.Tensor, r: torch.Tensor, tokens: bool, named_only: bool = False
) -> Iterator[tuple[tuple, Fit]]:
    """((dim, view), fit) for each axis' named maps (reverse, swap halves, roll and shift by one, head grouping), and
    the permutation fitted from the data when the axis is short and it is one no name gives."""
    for d, words, view in _axes(s, tuple(r.shape), tokens):
        cv, rv = c.reshape(view), r.reshape(view)
        named = [(name, how, idx, edge, 1) for name, how, idx, edge in _maps(view[d]) + _grouping(s, view[d])]
        if not named_only:  # a shift by more than one: k fitted, one parameter more
            named += [(name, how, idx, edge, 2) for name, how, idx, edge in _shifts(view[d], _fitted_shift(cv, rv, d))]
        perm = None if named_only else _fitted_permutation(cv, rv, d)
        if perm is not None and all(not torch.equal(perm, idx) for _, _, idx, _, _ in named):
            how = f"permuted: they hold Qwen3's {words} {perm.tolist()} in this order"
            named.append(("permutation", how, perm, None, 2))
        for name, how, idx, edge, cost in named:
            ev = _map_evidence(words, name, idx, edge)
            edit = Edit("index_map", f"{s.name()} has its {words} {how}", f"put its {words} in Qwen3's order", cost, ev)
            yield (d, view), Fit((edit,), _apply_map(rv, d, idx, edge).reshape(r.shape))


def _scales(
    s: Site, c: torch.Tensor, r: torch.Tensor, tokens: bool, signs_only: bool = False, only: tuple | None = None
) -> Iterator[Fit]:
    """One fitted scalar; per slice of each axis, least-squares factors: a sign pattern when they are +-1,
    else (cost 3) factors fitted on every other entry of the slices and judged on the rest, so that a fit
    with as many parameters as slices proves something."""
    ok = torch.isfinite(c) & torch.isfinite(r)
    a = float((c[ok] * r[ok]).sum() / r[ok].pow(2).sum()) if bool(ok.any()) else math.nan
    if not signs_only and math.isfinite(a) and abs(a - 1) > s.tol:
        edit = Edit(
            "scalar", f"{s.name()} is Qwen3's times {a:.4g}", "Qwen3 applies no such factor here", 1, {"factor": a}
        )
        yield Fit((edit,), _finite_mul(a, r))
    for d, words, view in _axes(s, tuple(r.shape), tokens):
        if only is not None and (d, view) != only:  # one axis of one view: where a map was applied
            continue
        n = view[d]
        cf, rf = (t.reshape(view).movedim(d, 0).reshape(n, -1) for t in (c, r))
        good = torch.isfinite(cf) & torch.isfinite(rf)
        cz, rz = cf.where(good, 0.0), rf.where(good, 0.0)
        f = (cz * rz).sum(1) / rz.pow(2).sum(1)
        neg = f < 0
        if bool(torch.isfinite(f).all()) and bool(neg.any()) and not bool(neg.all()):
            flipped = neg.nonzero().flatten().tolist()
            what = f"{s.name()} has the sign of its {words} {_ranges(flipped, n)} flipped"
            edit = Edit("sign_pattern", what, "Qwen3 flips no sign here", 1, {"axis": words, "flipped": flipped})
            yield Fit((edit,), _along(f.sign(), r, view, d))
        if signs_only or cf.shape[1] < 2:
            continue
        fit_on, judge = slice(0, None, 2), slice(1, None, 2)
        f = (cz[:, fit_on] * rz[:, fit_on]).sum(1) / rz[:, fit_on].pow(2).sum(1)
        if not bool(torch.isfinite(f).all()):
            continue
        ev = {"axis": words, "factor_min": float(f.min()), "factor_max": float(f.max())}
        what = (
            f"{s.name()} has each of its {words} scaled by its own factor ({ev['factor_min']:.3g}.."
            f"{ev['factor_max']:.3g}; fitted on half of the other entries, judged on the rest)"
        )
        fix = "Qwen3 applies no such scale: look for per-channel factors (dequantisation scales, a norm weight)"
        yield Fit(
            (Edit("per_slice_scale", what, fix, 3, ev),),
            _finite_mul(f[:, None], rf[:, judge]),
            cf[:, judge],
            rf[:, judge],
        )


def _ranges(idx: list[int], n: int) -> str:
    """Slot indices in words: 'the second half (16..31)', 'block 32..63', '3, 7'."""
    if idx == list(range(n // 2, n)):
        return f"in the second half ({n // 2}..{n - 1})"
    if idx == list(range(n // 2)):
        return f"in the first half (0..{n // 2 - 1})"
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}..{idx[-1]}"
    return ", ".join(map(str, idx))


# ---- structural edits: the op replayed otherwise -------------------------------------------------------


def _group(op: str) -> str:
    return "norm" if op in NORM_OPS else "rope" if op in ("q_rope", "k_rope") else op


def _structural(
    s: Site, ins: list[torch.Tensor], qwen3: torch.Tensor, rows: torch.Tensor | None
) -> list[tuple[Edit, torch.Tensor]]:
    """The op applied twice, skipped, run in the other order with its neighbour, RoPE at positions off by one,
    one term of a sum scaled by a fitted scalar: replayed on the tokens `rows` (None: all), which `ins` and
    `qwen3` hold."""
    n, out = s.name(), []
    pos = s.positions(rows)
    if s.op in _SAME_SHAPE and ins[0].numel() == qwen3.numel():
        twice = replay_op(s, [qwen3.reshape(ins[0].shape)], rows)
        group, source = _group(s.op), s.inputs[0]
        if twice is not None:
            what, fix = {
                "norm": (f"{n} is the RMSNorm applied twice", "apply it once"),
                "rope": (f"{n} is {source} rotated twice", "RoPE is applied twice; rotate once"),
            }.get(group, (f"{n} is its op applied twice", "apply it once"))
            out.append((Edit("twice", what, fix), twice))
        what, fix = {
            "norm": (f"{n} is its input unchanged", "the RMSNorm is skipped; apply it"),
            "rope": (f"{n} is {source} unrotated", "RoPE is not applied; rotate it"),
        }.get(group, (f"{n} is its input unchanged", "the op is skipped; apply it"))
        out.append((Edit("skipped", what, fix), ins[0].reshape(qwen3.shape)))
    for first, second in _NEIGHBOURS:
        if s.op not in (first, second):
            continue
        source = inputs_of(s.name(first), s.cfg)[0]  # what Qwen3 feeds the first of the two
        x, w = s.operand(source), s.weight_at(s.weight_name(OPS_BY_NAME[first].module + ".weight"))
        if x is None or w is None:
            continue
        x = x if rows is None else x.index_select(1, rows)  # q_proj, k_proj: [B,T,n*D]
        rotated = rotate(x.reshape(qwen3.shape), rope_angles(pos, s.cfg.head_dim, s.cfg.rope_theta, False))
        swapped = rotated if s.op == first else rms_norm(rotated, w, s.cfg.rms_norm_eps)
        what = f"RoPE of {source}" if s.op == first else f"{first[2:]} of RoPE of {source}"
        why = f"RoPE runs before {first} where Qwen3 normalises first; apply {first}, then RoPE"
        out.append((Edit("swapped", f"{n} is {what}", why), swapped))
    if s.op in ("q_rope", "k_rope"):
        for k in (1, -1):
            angles = rope_angles(pos + k, s.cfg.head_dim, s.cfg.rope_theta, False)
            edit = Edit(
                "rope_offset",
                f"{n} is rotated for position p{k:+d}",
                f"RoPE positions are off by {k:+d}",
                1,
                {"position_offset": k},
            )
            out.append((edit, rotate(ins[0], angles)))
    if s.op in _SUMS:
        c = s.pick(s.cand(), rows)
        for i, j in ((0, 1), (1, 0)):  # one term scaled by a fitted scalar, the other as it is
            x, rest = ins[i].reshape(c.shape), ins[j].reshape(c.shape)
            a = float(((c - rest) * x).sum() / x.pow(2).sum())
            if math.isfinite(a) and abs(a - 1) > replay_floor(s):
                what = f"{n} adds {s.inputs[i]} times {a:.4g}"
                edit = Edit("operand_scaled", what, "Qwen3 adds it as it is", 1, {"operand": s.inputs[i], "factor": a})
                out.append((edit, a * x + rest))
    return out


def _operand_maps(s: Site, ins: list[torch.Tensor], rows: torch.Tensor | None) -> Iterator[tuple[Edit, torch.Tensor]]:
    """The op replayed on one operand with a named index map on one of its axes (v heads read in reverse
    order, keys read one position late, q_proj reading attn_norm's channels reversed, ...): for the ops that
    mix their operands, where a map of an input is no map of the output. The map acts on the operand's every
    token; the replay is of `rows` of the tokens only (all: None)."""
    for slot, name in enumerate(s.inputs):
        _, op = parse_tap_name(name)
        for d, words, view in _axes(s, tuple(ins[slot].shape), True, op):
            x = ins[slot].reshape(view)
            for map_name, how, idx, edge in _maps(view[d]) + _grouping(s, view[d]):
                moved = _apply_map(x, d, idx, edge).reshape(ins[slot].shape)
                replay = replay_rows(s, ins[:slot] + [moved] + ins[slot + 1 :], rows)
                if replay is not None:
                    ev = {"operand": name} | _map_evidence(words, map_name, idx, edge)
                    what = f"{s.name()} reads {name} with its {words} {how}"
                    yield Edit("index_map", what, f"read its {words} in Qwen3's order", 1, ev), replay


# ---- the search ------------------------------------------------------------------------------------------


def _signature(s: Site, fit: Fit) -> str:
    if len(fit.edits) > 1:
        return "composed"
    e = fit.edits[0]
    return _LISTED.get((e.kind, _group(s.op)), _LISTED.get((e.kind, s.op), e.kind))


def _resid(c: torch.Tensor, replay: torch.Tensor) -> float:
    """`rel(c, replay)`, in one pass where every difference is finite (most fits); `rel` where masked or
    non-finite entries need its rules."""
    diff = c - replay
    if bool(torch.isfinite(diff).all()):
        den = float(torch.linalg.vector_norm(replay))
        return float(torch.linalg.vector_norm(diff)) / den if den > 0 else math.inf
    return rel(c, replay)


def _best(s: Site, fits: Iterator[Fit], c: torch.Tensor, base: torch.Tensor) -> Diagnosis | None:
    """The simplest fit, then the closest, that passes the gate; only fits within the noise are kept."""
    kept = []
    for i, f in enumerate(fits):
        r = _resid(c if f.cand is None else f.cand, f.replay)
        if r <= (s.tol if f.floor is None else f.floor):
            kept.append((f.cost, r, i, f))
    for _, _, _, f in sorted(kept, key=lambda t: t[:3]):
        ev = {"edits": [{"kind": e.kind} | e.evidence for e in f.edits], "cost": f.cost}
        what, why = "; and ".join(e.words for e in f.edits), "; ".join(e.fix for e in f.edits)
        cand, unchanged = (c, base) if f.cand is None else (f.cand, f.unchanged)
        d = s.explained(_signature(s, f), what, why, f.replay, ev, cand=cand, unchanged=unchanged, floor=f.floor)
        if d is not None:
            return d
    return None


def search(s: Site) -> Diagnosis | None:
    """One edit of the op, then two: structural edits replayed from the candidate's own operands, output
    edits fitted on the reference's tap and on each structural replay, sign patterns on each named map."""
    c, base = s.cand(), s.base()
    if c is None or base is None or not c.is_floating_point():
        return None
    rows = s.fit_rows(c)  # a large tap: every replay and fit on these tokens only
    c, base = s.pick(c, rows), s.pick(base, rows)
    inner, ins = [], []
    if s.op in _SAME_SHAPE + _SUMS + _MIXING + tuple(op for pair in _NEIGHBOURS for op in pair):
        ins = [s.operand(n) for n in s.inputs]
        qwen3 = replay_rows(s, ins, rows) if all(t is not None for t in ins) else None
        if qwen3 is None or qwen3.shape != c.shape:
            ins = []
    if ins:
        inner = _structural(s, on_rows(s, ins, rows), qwen3, rows)
    whole = rows is None  # every token held: maps along the tokens make sense

    def own(edits: tuple[Edit, ...], replay: torch.Tensor) -> Fit:
        """An edit replayed from the candidate's own operands: judged against the op replayed from them."""
        return Fit(edits, replay, c, qwen3, replay_floor(s))

    def singles() -> Iterator[Fit]:
        yield from (own((e,), r) for e, r in inner)
        if ins and s.op in _MIXING:
            yield from (own((e,), r) for e, r in _operand_maps(s, ins, rows))
        yield from (f for _, f in _index_maps(s, c, base, whole))
        yield from _scales(s, c, base, whole)

    def pairs() -> Iterator[Fit]:
        for e, r in inner:
            for _, f in _index_maps(s, c, r, whole, named_only=True):
                yield own((e,) + f.edits, f.replay)
            for f in _scales(s, c, r, whole):
                if f.cand is None:
                    yield own((e,) + f.edits, f.replay)
        for axis, m in _index_maps(s, c, base, whole, named_only=True):  # a map, then signs on the same axis
            for f in _scales(s, c, m.replay, whole, signs_only=True, only=axis):
                yield Fit(m.edits + f.edits, f.replay)

    return _best(s, singles(), c, base) or _best(s, pairs(), c, base)


#: the grammar's own ids, one per row it adds, and the listed ids an edit maps to
IDS = (
    "index_map",
    "sign_pattern",
    "scalar",
    "per_slice_scale",
    "operand_scaled",
    "twice",
    "skipped",
    "swapped",
    "composed",
)
HYPOTHESES = (Hypothesis(IDS + tuple(_LISTED.values()), ("*",), search),)
