"""Replay with the op's known variants: the op recomputed the way other engines compute it (low-precision
accumulation, attention rebuilt with one known slip at a time, a softmax without max subtraction), and
where NaN/inf are first born."""

from __future__ import annotations

import math

import torch

from qwen3dbg.diff.diagnosis.hypothesis import MATMUL_MODULE, NORM_OPS, NORM_WEIGHT, Hypothesis, is_linear, norm_input
from qwen3dbg.diff.diagnosis.replay import attention, scores
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site, floors, ulps_phrase
from qwen3dbg.diff.metrics import rel, ulps
from qwen3dbg.reference.qwen3 import accumulate_lowp
from qwen3dbg.tapstore.schema import parse_tap_name, tap_name
from qwen3dbg.tapstore.store import masked


def lowp_accumulation(s: Site) -> Diagnosis | None:
    """Replay the matmul on the candidate's own input, once summing in float64 and rounding once (what
    a float32 accumulator gives) and once rounding every product and partial sum to the activation
    dtype; name it when the two are far enough apart to tell and the candidate is within 2x of the second.
    The residual is that factor's distance from 1, in units of 2x (rounding orders differ element-wise)."""
    if s.eps < 1e-4 or not is_linear(s) or s.op == "logits":
        return None
    x, w, g = s.cand(s.input_op), s.weight(MATMUL_MODULE[s.op] + ".weight"), s.src.gold(s.step, s.name())
    if any(t is None for t in (x, w, g)):
        return None
    act = s.src.dtype
    rows = s.tokens()  # the replay rounds K times per output: a sample of tokens suffices
    x, w, g, c = x[:, rows].to(act), w.to(act), g[:, rows], s.cand()[:, rows]
    exact = x.double() @ w.double().T
    e_c = rel(c, g)
    e_right = rel(exact.to(act), g)
    # An error that one factor per output channel takes back to a rounding or two is a scale, not a sum:
    # accumulation errors vary from token to token.
    per_channel = (c * exact).sum(1, keepdim=True) / exact.pow(2).sum(1, keepdim=True)  # [B,1,N]
    if rel(c, per_channel * exact) <= 1.6 * e_right:
        return None
    e_lp = rel(accumulate_lowp(x, w), g)
    if min(e_c, e_right) == 0 or not math.isfinite(e_c):
        return None
    off_lp, off_right = abs(math.log(e_c / e_lp)), abs(math.log(e_c / e_right))
    if e_lp < 2 * e_right or off_lp > math.log(2) or off_lp > off_right:
        return None
    k = x.shape[-1]
    return Diagnosis(
        "lowp_accumulation",
        f"{s.name()} is {e_c:.2g} from fp64 (rel. L2); replayed on its own input, "
        f"summing its {k} products per output in float32 gives {e_right:.2g} and in {s.dtype_name} "
        f"{e_lp:.2g} (residual {floors(off_lp / math.log(2))}): the matmul accumulates in "
        f"{s.dtype_name}; accumulate in float32",
        {
            "rel_err": e_c,
            "replay_fp32_rel_err": e_right,
            "replay_lowp_rel_err": e_lp,
            "reduction_length": k,
            "residual_in_noise": off_lp / math.log(2),
        },
    )


def attention_rebuilt(s: Site) -> Diagnosis | None:
    """For engines that expose no attention matrices: recompute attn_out from the candidate's own q_rope,
    k_cache and v_cache, the Qwen3 way, with one known slip at a time, and over another layer's cache."""
    q, k, v, c = s.cand("q_rope"), s.cand("k_cache"), s.cand("v_cache"), s.cand()
    if q is None or k is None or v is None or s.cand("attn_probs") is not None:
        return None
    cfg, pos = s.cfg, s.positions()
    right = {"kv_of_head": s.kv_of_head, "scale": cfg.head_dim**-0.5}
    as_qwen3 = rel(c, attention(q, k, v, pos, **right))
    if as_qwen3 <= s.tol:
        return None
    modulo = [h % cfg.num_key_value_heads for h in range(cfg.num_attention_heads)]
    slips = [
        ("causal_mask_missing", {"causal": False}, "no causal mask", "the causal mask is missing"),
        ("scores_scaled", {"scale": 1.0}, "no 1/sqrt(head_dim) scale", "the 1/sqrt(head_dim) scale is missing"),
        ("softmax_axis", {"softmax_dim": -2}, "the softmax over queries", "softmax taken over the wrong axis"),
    ]
    if modulo != right["kv_of_head"]:
        slips.append(
            (
                "gqa_modulo",
                {"kv_of_head": modulo},
                f"query head h reading kv head h % {cfg.num_key_value_heads}",
                "the GQA head mapping uses modulo",
            )
        )
    tried = [
        (rel(c, attention(q, k, v, pos, **(right | change))), sig, what, why, {}) for sig, change, what, why in slips
    ]
    for layer in range(cfg.num_hidden_layers):
        kl, vl = s.operand(tap_name("k_cache", layer)), s.operand(tap_name("v_cache", layer))
        if layer != s.layer and kl is not None and vl is not None and kl.shape == k.shape:
            tried.append(
                (
                    rel(c, attention(q, kl, vl, pos, **right)),
                    "input_substituted",
                    f"layer {layer}'s k_cache and v_cache",
                    f"layer {s.layer} attends over layer {layer}'s cache; read layer {s.layer}'s",
                    {"operand": tap_name("k_cache", layer), "expected": tap_name("k_cache", s.layer)},
                )
            )
    resid, sig, what, why, ev = min(tried, key=lambda t: t[0])
    return s.explained(
        sig,
        f"{s.name()} is what the candidate's own q_rope, k_cache and v_cache give with {what} "
        f"(attending as Qwen3 leaves {as_qwen3:.2g})",
        why,
        resid,
        ev | {"residual_as_qwen3": as_qwen3, "rebuilt_from": "attn_out"},
    )


def softmax_overflow(s: Site) -> Diagnosis | None:
    """NaN/inf born in the softmax: its scores are finite but pass log(max) of the dtype. Where the
    candidate exposes no scores (its first NaN is then attn_out), they are rebuilt from q_rope and k_cache."""
    sc, source = s.cand("attn_scores"), "its input attn_scores is"
    if sc is None:
        q, k = s.cand("q_rope"), s.cand("k_cache")
        if q is None or k is None:
            return None
        sc = scores(q, k, s.positions(), s.kv_of_head, s.cfg.head_dim**-0.5)
        source = "the scores its q_rope and k_cache give are"
    live = sc[~masked(sc)]
    limit = math.log(torch.finfo(s.src.dtype).max)
    top = float(live.max())
    if not bool(torch.isfinite(live).all()) or top <= limit:
        return None
    out = s.cand()
    bad = int((~torch.isfinite(out)).sum())
    return Diagnosis(
        "softmax_overflow",
        f"NaN/inf first produced by {s.name()} in {s.dtype_name} ({bad} of "
        f"{out.numel()} values) while {source} finite with max {top:.4g} > log(max {s.dtype_name}) = "
        f"{limit:.2f}: softmax without max subtraction overflows exp; subtract the row max first",
        {"nonfinite": bad, "max_score": top, "exp_limit": limit},
    )


def nonfinite(s: Site) -> Diagnosis | None:
    """The generic fallback for NaN/inf: where they first appear, and how many."""
    c, r = s.cand(), s.base()
    nan, inf = int(torch.isnan(c).sum()), int(torch.isinf(c).sum())
    return Diagnosis(
        "nonfinite",
        f"NaN/inf first produced by {s.name()} in {s.dtype_name} ({nan} NaN, {inf} inf of "
        f"{c.numel()} values) where the reference is finite (max |x| "
        f"{float(r[torch.isfinite(r)].abs().max()):.4g})",
        {"nan": nan, "inf": inf, "numel": c.numel()},
    )


def amplification(src, tap: str) -> float:
    """How much what follows a rounding magnifies it: transformers casts a normalised value and THEN
    multiplies by the RMSNorm weight, so a rounding difference at a norm leaves it max|weight| times
    larger (k_norm ~96.5 in released Qwen3). 1 for every other op."""
    layer, op = parse_tap_name(tap)
    if op not in NORM_WEIGHT:
        return 1.0
    w = src.weight(NORM_WEIGHT[op] if layer is None else f"model.layers.{layer}.{NORM_WEIGHT[op]}")
    return 1.0 if w is None else max(1.0, float(w.abs().max()))


def rounding_point(s: Site) -> Diagnosis | None:
    """Does the candidate round RMSNorm after the weight (fused) where the reference rounds before?"""
    x, w, c = norm_input(s), s.weight(NORM_WEIGHT[s.op]), s.cand()
    if x is None or w is None:
        return None
    act = s.src.dtype
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.cfg.rms_norm_eps)
    fused = (w * xhat).to(act).double()
    unfused = (w.to(act) * xhat.to(act)).double()
    share_fused = float((c == fused).double().mean())
    if share_fused < 0.9 or share_fused <= float((c == unfused).double().mean()):
        return None
    base = s.base()
    n = ulps(c, base, act) if base is not None else 0.0
    wmax = float(w.abs().max())
    amplified = f"; {s.op} weight {wmax:.1f} amplifies the reference's rounding" if wmax > 2 else ""
    return Diagnosis(
        "rounding_point",
        f"{s.name()} differs by up to {ulps_phrase(n, s.dtype_name)}: the RMSNorm weight is "
        f"applied before rounding here and after it in the reference{amplified}",
        {
            "max_ulps": n,
            "share_matching_fused": share_fused,
            "max_weight": wmax,
            "residual_in_noise": s.floors(rel(c, fused)),
        },
    )


HYPOTHESES = (
    Hypothesis(("softmax_overflow",), ("attn_probs", "attn_out"), softmax_overflow, nonfinite=True),
    Hypothesis(("rounding_point",), NORM_OPS, rounding_point),
    Hypothesis(
        ("causal_mask_missing", "scores_scaled", "softmax_axis", "gqa_modulo", "input_substituted"),
        ("attn_out",),
        attention_rebuilt,
    ),
    Hypothesis(("lowp_accumulation",), tuple(op for op in MATMUL_MODULE if op != "logits"), lowp_accumulation),
    Hypothesis(("nonfinite",), ("*",), nonfinite, nonfinite=True),
)
