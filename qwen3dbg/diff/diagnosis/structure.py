"""Structural variants: the op replayed with its structure changed. Permutations along named axes (heads,
channel pairs, positions, experts), LayerNorm for RMSNorm, operands swapped. (An op skipped or applied twice
is an edit of the grammar, `grammar.py`, which reports the listed ids for norms and RoPE.)"""

from __future__ import annotations

import torch

from qwen3dbg.diff.diagnosis.hypothesis import NORM_OPS, Hypothesis, norm_input, norm_weight_name, replay_floor
from qwen3dbg.diff.diagnosis.replay import experts_mix, layer_norm, rms_norm, scores
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
from qwen3dbg.diff.metrics import ranked, rel
from qwen3dbg.reference.qwen3 import causal_mask, swiglu
from qwen3dbg.tapstore.store import masked


def _best(c: torch.Tensor, variants) -> tuple[str, torch.Tensor, str, str] | None:
    """(signature, replay, what, why) of the variant closest to c; variants yield (id, tensor, what, why)."""
    return min(variants, key=lambda v: ranked(rel(c, v[1])), default=None)


def norm_variants(s: Site) -> Diagnosis | None:
    """The norm's output against its own input with its structure changed: without its weight, Gemma's
    (1 + weight), LayerNorm. (Skipped or applied twice: edits of the grammar, `grammar.py`.)"""
    x, w, c = norm_input(s), s.weight_at(norm_weight_name(s)), s.cand()
    if x is None or w is None:
        return None
    eps, n = s.cfg.rms_norm_eps, s.name()
    qwen3 = rms_norm(x, w, eps)
    if rel(c, qwen3) <= replay_floor(s):
        return None
    best = _best(
        c,
        (
            (
                "norm_weight_missing",
                rms_norm(x, 1.0, eps),
                f"{n} is its input normalised without the weight",
                "the RMSNorm weight is not applied; multiply by it",
            ),
            (
                "norm_weight_one_plus",
                rms_norm(x, 1 + w, eps),
                f"{n} is its input normalised times (1 + weight)",
                "Gemma's convention; Qwen3 multiplies by the weight itself",
            ),
            (
                "layer_norm",
                layer_norm(x, w, eps),
                f"{n} is a LayerNorm of its input (mean subtracted)",
                "Qwen3's RMSNorm does not subtract the mean; use RMSNorm",
            ),
        ),
    )
    return s.explained(best[0], best[2], best[3], best[1], unchanged=qwen3, floor=replay_floor(s))


def norm_over_all_heads(s: Site) -> Diagnosis | None:
    """q_norm/k_norm over all heads jointly: the replay normalises [..., nH*D] at once."""
    c, w, x = s.cand(), s.weight_at(norm_weight_name(s)), norm_input(s)
    if w is None or x is None:
        return None
    eps, n = s.cfg.rms_norm_eps, c.shape[-2]
    qwen3 = rms_norm(x, w, eps)
    if rel(c, qwen3) <= replay_floor(s):
        return None
    joint = rms_norm(x.flatten(-2), w.repeat(n), eps).reshape(c.shape)
    per_head = (c / w).pow(2).mean(-1).sqrt()  # [B,T,n]: the RMS each head got before its weight
    ev = {
        "per_head_rms_min": float(per_head.min()),
        "per_head_rms_max": float(per_head.max()),
        "joint_rms": float((c / w).flatten(-2).pow(2).mean(-1).sqrt().mean()),
        "joint_rms_expected": float(
            (x.flatten(-2).pow(2).mean(-1) / (x.flatten(-2).pow(2).mean(-1) + eps)).sqrt().mean()
        ),
        "heads": n,
    }
    return s.explained(
        "norm_axis",
        f"{s.name()} is normalised over all {n} heads jointly (the RMS of {s.op}/weight "
        f"per head ranges {ev['per_head_rms_min']:.3f}..{ev['per_head_rms_max']:.3f})",
        f"Qwen3 normalises each head over head_dim {c.shape[-1]}",
        joint,
        ev,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def transpose_before_reshape(s: Site) -> Diagnosis | None:
    """attn_out read back as [B,nH,T,D] and transposed: heads and tokens permuted."""
    c, r = s.cand(), s.base()  # [B,T,nH*D]
    B, T, _ = c.shape
    if T == 1:
        return None
    # the reference's [B,nH,T,D] context read as [B,T,nH*D] without the transpose back
    untransposed = r.reshape(B, T, -1, s.cfg.head_dim).transpose(1, 2).reshape(B, T, -1)
    undone = c.reshape(B, -1, T, s.cfg.head_dim).transpose(1, 2).reshape(B, T, -1)
    return s.explained(
        "transpose_before_reshape",
        "attn_out is a permutation of the reference: read as [B,nH,T,D] and transposed to [B,T,nH,D] it matches",
        "heads and tokens are not transposed back before the reshape",
        untransposed,
        {"rel_err_as_is": rel(c, r), "rel_err_transposed": rel(undone, r)},
    )


def gqa_mapping(s: Site) -> Diagnosis | None:
    """A permutation along heads: for each query head, the kv head whose keys (from the candidate's own
    cache) give its scores."""
    q, k, sc = s.cand("q_rope"), s.cand("k_cache"), s.cand()
    c = s.cfg
    if q is None or k is None or c.n_rep == 1:
        return None
    valid = ~masked(sc)  # [B,nH,T,S]
    every_head_reads = [
        scores(q, k, s.positions(), [g] * c.num_attention_heads, c.head_dim**-0.5, causal=False)
        for g in range(c.num_key_value_heads)
    ]
    mapping, resid = [], []
    for h in range(c.num_attention_heads):
        errs = [rel(sc[:, h][valid[:, h]], hyp[:, h][valid[:, h]]) for hyp in every_head_reads]
        g = min(range(len(errs)), key=errs.__getitem__)
        mapping.append(g)
        resid.append(errs[g])
    expected = s.kv_of_head
    if mapping == expected:
        return None
    modulo = [h % c.num_key_value_heads for h in range(c.num_attention_heads)]
    ev = {"mapping": mapping, "expected": expected, "worst_head_residual": max(resid)}
    replay = scores(q, k, s.positions(), mapping, c.head_dim**-0.5)
    qwen3 = scores(q, k, s.positions(), expected, c.head_dim**-0.5)
    if mapping == modulo:
        return s.explained(
            "gqa_modulo",
            f"query heads read kv heads {mapping} (h % {c.num_key_value_heads}), the "
            f"config implies {expected} (h // {c.n_rep})",
            f"the GQA head mapping uses modulo; use h // {c.n_rep}",
            replay,
            ev,
            unchanged=qwen3,
            floor=replay_floor(s),
        )
    return s.explained(
        "gqa_mapping",
        f"query heads read kv heads {mapping}, the config implies {expected} (h // {c.n_rep})",
        "the GQA head mapping is wrong",
        replay,
        ev,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def causal_mask_missing(s: Site) -> Diagnosis | None:
    """Scores (or their softmax) replayed from the candidate's q_rope and k_cache without the causal mask, on
    the query rows a fit looks at (`Site.fit_rows`) when the tap is large."""
    sc, q, k = s.cand("attn_scores"), s.operand(s.name("q_rope")), s.operand(s.name("k_cache"))
    if q is None or k is None:
        return None
    c, pos = s.cand(), s.positions()
    future = causal_mask(pos, k.shape[2]).expand_as(c)  # [B,nH,T,S]
    if not bool(future.any()) or bool((masked(c) | (c == 0) | ~future).all()):
        return None  # no future key, or the candidate masks every one: nothing for the replay to show
    ev = {"future_entries": int(future.sum())}
    if sc is not None:
        ev["reached"] = int((future & ~masked(sc)).sum())
    msg = (
        f"attention reaches future positions: {ev.get('reached', 'all')} of {ev['future_entries']} future "
        "(query < key) score entries are not masked"
    )
    probs = s.cand("attn_probs")
    if probs is not None:
        ev["future_mass"] = float(probs.where(future, 0.0).sum() / probs.sum())
        msg += f" and carry {ev['future_mass']:.0%} of the attention mass"
    if (rows := s.fit_rows(c)) is not None:
        c, q, pos = s.pick(c, rows), q.index_select(1, rows), s.positions(rows)
    hyp = scores(q, k, pos, s.kv_of_head, s.cfg.head_dim**-0.5, causal=False)
    masked_hyp = scores(q, k, pos, s.kv_of_head, s.cfg.head_dim**-0.5)
    replay, qwen3 = (hyp, masked_hyp) if s.op == "attn_scores" else (hyp.softmax(-1), masked_hyp.softmax(-1))
    return s.explained(
        "causal_mask_missing",
        msg,
        "the causal mask is missing; mask keys after the query's position",
        replay,
        ev,
        cand=c,
        unchanged=qwen3,
    )


def softmax_axis(s: Site) -> Diagnosis | None:
    """The softmax of the candidate's own scores taken over queries instead of keys."""
    sc, p = s.cand("attn_scores"), s.cand()
    if sc is None or p.shape[-2] == 1:
        return None
    ev = {"row_sum_min": float(p.sum(-1).min()), "row_sum_max": float(p.sum(-1).max())}
    return s.explained(
        "softmax_axis",
        f"rows of attn_probs sum to {ev['row_sum_min']:.3g}..{ev['row_sum_max']:.3g} "
        "over keys, and they are the softmax of attn_scores over queries",
        "softmax taken over the wrong axis; take it over keys (dim=-1)",
        sc.softmax(-2),
        ev,
        unchanged=sc.softmax(-1),
        floor=replay_floor(s),
    )


def cache_off_by_one(s: Site) -> Diagnosis | None:
    """A permutation along positions: at decode, with the prefill's cache right, slots that hold the
    reference's neighbour slot, or nothing."""
    if s.step == 0:
        return None
    c, r = s.cand(), s.base()  # [B,nKV,S,D]
    prefill = s.cand(step=0), s.base(step=0)
    if any(t is None for t in prefill) or rel(*prefill) > s.tol:
        return None
    scale = float(torch.linalg.vector_norm(r)) / r.shape[2] ** 0.5
    slot_err = [float(torch.linalg.vector_norm(c[:, :, j] - r[:, :, j])) / scale for j in range(r.shape[2])]
    bad = [j for j, e in enumerate(slot_err) if e > s.tol]
    for shift in (1, -1):
        moved = [j for j in bad if 0 <= j + shift < r.shape[2] and rel(c[:, :, j], r[:, :, j + shift]) <= s.tol]
        empty = [j for j in bad if float(c[:, :, j].abs().max()) == 0]
        if not moved or sorted(moved + empty) != bad:
            continue
        hyp = r.clone()
        for j in moved:
            hyp[:, :, j] = r[:, :, j + shift]
        hyp[:, :, empty] = 0
        where = "one slot early" if shift == 1 else "one slot late"
        return s.explained(
            "cache_off_by_one",
            f"prefill agrees, decode step {s.step} diverges: {s.op} slot "
            f"{moved[-1]} holds the entry the reference has at slot {moved[-1] + shift}"
            + (f", slot {empty[-1]} is empty" if empty else ""),
            f"the cache is off by one (entries written {where})",
            hyp,
            {"step": s.step, "shift": shift, "moved_slots": moved, "empty_slots": empty},
        )
    return None


def moe_weights_normalisation(s: Site) -> Diagnosis | None:
    """Top-k weights replayed from the candidate's router logits and choice, renormalised or not."""
    logits, ids, c = s.operand(s.name("moe.router_logits")), s.cand("moe.topk_ids"), s.cand()
    if logits is None or ids is None:
        return None
    picked = logits.softmax(-1).gather(-1, ids.long())
    norm = s.cfg.norm_topk_prob
    renormalised = picked / picked.sum(-1, keepdim=True)
    ev = {
        "cand_sum_mean": float(c.sum(-1).mean()),
        "ref_sum_mean": float(s.base().sum(-1).mean()),
        "norm_topk_prob": norm,
    }
    if norm:
        return s.explained(
            "moe_topk_not_normalised",
            f"moe.topk_weights sum to {ev['cand_sum_mean']:.3g} per token on average though norm_topk_prob is true",
            "the top-k weights are not renormalised",
            picked,
            ev,
            unchanged=renormalised,
        )
    return s.explained(
        "moe_topk_softmax",
        f"moe.topk_weights sum to 1 per token though norm_topk_prob is false "
        f"(reference: {ev['ref_sum_mean']:.3g} on average, the top-k share of a softmax over all "
        f"{s.cfg.num_experts} experts)",
        "softmax over the top-k logits only, or a renormalisation",
        renormalised,
        ev,
        unchanged=picked,
    )


def swiglu_swapped(s: Site) -> Diagnosis | None:
    """mlp.act from the candidate's own gate and up, with the two swapped: silu(up) * gate."""
    gate, up, c = s.operand(s.name("mlp.gate")), s.operand(s.name("mlp.up")), s.cand()
    if gate is None or up is None or rel(c, swiglu(gate, up)) <= replay_floor(s):
        return None
    return s.explained(
        "swiglu_swapped",
        f"{s.name()} is silu(up) * gate",
        "gate and up are swapped in SwiGLU; Qwen3 computes silu(gate_proj(x)) * up_proj(x)",
        swiglu(up, gate),
        unchanged=swiglu(gate, up),
        floor=replay_floor(s),
    )


#: tokens a MoE replay mixes (each costs k experts' three matmuls)
MOE_TOKENS = 4


def moe_experts(s: Site) -> Diagnosis | None:
    """A MoE layer's output replayed from the candidate's own input and routing, with the experts permuted
    (expert e's weights used for e + 1, or e - 1) or each expert's gate and up swapped."""
    if not s.cfg.is_moe_layer(s.layer):
        return None
    x, ids, wts = (s.operand(s.name(op)) for op in ("mlp_norm", "moe.topk_ids", "moe.topk_weights"))
    if x is None or ids is None or wts is None:
        return None
    t, E = s.tokens(MOE_TOKENS), s.cfg.num_experts
    x, ids, wts, c = x[0, t], ids[0, t].long(), wts[0, t], s.cand()[0, t]

    def expert(shift: int = 0, swap: bool = False):
        def mats(e: int):
            p = s.weight_name(f"mlp.experts.{(e + shift) % E}.")
            g, u, d = (s.weight_at(p + m + ".weight") for m in ("gate_proj", "up_proj", "down_proj"))
            return None if d is None else ((u, g, d) if swap else (g, u, d))

        return mats

    qwen3 = experts_mix(x, ids, wts, expert())
    if qwen3 is None or rel(c, qwen3) <= s.tol:
        return None
    tried = [(experts_mix(x, ids, wts, expert(shift)), "moe_expert_index", shift) for shift in (-1, 1)]
    tried.append((experts_mix(x, ids, wts, expert(swap=True)), "swiglu_swapped", 0))
    replay, sig, shift = min(
        (t for t in tried if t[0] is not None), key=lambda t: ranked(rel(c, t[0])), default=(None, "", 0)
    )
    if replay is None:
        return None
    if sig == "swiglu_swapped":
        return s.explained(
            sig,
            f"{s.name()} is each expert's silu(up) * gate",
            "gate and up are swapped in the experts' SwiGLU",
            replay,
            cand=c,
            unchanged=qwen3,
        )
    return s.explained(
        sig,
        f"{s.name()} mixes expert e{shift:+d}'s weights where the router chose expert e",
        "the experts are indexed off by one; use experts.{e} for id e",
        replay,
        {"expert_shift": shift},
        cand=c,
        unchanged=qwen3,
    )


HYPOTHESES = (
    Hypothesis(("norm_axis",), ("q_norm", "k_norm"), norm_over_all_heads),
    Hypothesis(
        ("norm_weight_missing", "norm_weight_one_plus", "layer_norm"),
        NORM_OPS,
        norm_variants,
    ),
    Hypothesis(("cache_off_by_one",), ("k_cache", "v_cache"), cache_off_by_one),
    Hypothesis(("causal_mask_missing",), ("attn_scores", "attn_probs"), causal_mask_missing),
    Hypothesis(("gqa_modulo", "gqa_mapping"), ("attn_scores",), gqa_mapping),
    Hypothesis(("softmax_axis",), ("attn_probs",), softmax_axis),
    Hypothesis(("transpose_before_reshape",), ("attn_out",), transpose_before_reshape),
    Hypothesis(("moe_topk_softmax", "moe_topk_not_normalised"), ("moe.topk_weights",), moe_weights_normalisation),
    Hypothesis(("swiglu_swapped",), ("mlp.act",), swiglu_swapped),
    Hypothesis(("moe_expert_index", "swiglu_swapped"), ("mlp.out",), moe_experts),
)
