"""Replay with the op's known variants: the op recomputed the way other engines compute it (low-precision
accumulation, attention rebuilt with one known slip at a time, a softmax without max subtraction), and
where NaN/inf are first born."""

from __future__ import annotations

import math

import torch

from qwen3dbg.diff.diagnosis.hypothesis import MATMUL_MODULE, NORM_OPS, NORM_WEIGHT, Hypothesis, is_linear, norm_input
from qwen3dbg.diff.diagnosis.replay import attention, scores
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site, ulps_phrase
from qwen3dbg.diff.metrics import ranked, rel, ulps
from qwen3dbg.reference.qwen3 import accumulate_lowp
from qwen3dbg.tapstore.schema import parse_tap_name, tap_name
from qwen3dbg.tapstore.store import masked


def lowp_accumulation(s: Site) -> Diagnosis | None:
    """Replay the matmul on the candidate's own input with one running sum kept in the activation dtype, in
    ascending k, each product rounded first or added exactly (a fused multiply-add); through the gate: the
    replay must reproduce the candidate within the noise where Qwen3's one wide sum does not. Another
    summation order (blocked, pairwise, split-K) matches no element-wise replay, and stays unnamed."""
    if s.eps < 1e-4 or not is_linear(s) or s.op == "logits":
        return None
    x, w = s.cand(s.input_op), s.weight(MATMUL_MODULE[s.op] + ".weight")
    if x is None or w is None:
        return None
    act = s.src.dtype
    rows = s.tokens()  # the replay rounds K times per output: a sample of tokens suffices
    x, w, c = x[:, rows].to(act), w.to(act), s.cand()[:, rows]
    qwen3 = (x.double() @ w.double().T).to(act)
    replays = {"each product rounded": accumulate_lowp(x, w), "products exact": _accumulate_exact_products(x, w)}
    how, replay = min(replays.items(), key=lambda kv: ranked(rel(c, kv[1])))
    g, k = s.src.gold(s.step, s.name()), x.shape[-1]
    errors = {}
    if g is not None:
        g = g[:, rows]
        errors = {"rel_err": rel(c, g), "replay_fp32_rel_err": rel(qwen3, g), "replay_lowp_rel_err": rel(replay, g)}
    return s.explained(
        "lowp_accumulation",
        f"{s.name()} sums its {k} products per output in one running {s.dtype_name} sum ({how}): replayed so "
        f"on its own input",
        f"the matmul accumulates in {s.dtype_name}; accumulate in float32",
        replay,
        {"reduction_length": k, "products": how} | errors,
        cand=c,
        unchanged=qwen3,
    )


def _accumulate_exact_products(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K].T with each product exact (a product of two bf16 or fp16 values is exact in
    float32) added to a running sum rounded to x's dtype after every add: a fused multiply-add loop."""
    acc = torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    for k in range(x.shape[-1]):
        acc = (acc.float() + x[..., k, None].float() * w[:, k].float()).to(x.dtype)
    return acc


#: narrower float formats a KV cache may keep keys and values in (vLLM's kv_cache_dtype fp8 / fp8_e5m2):
#: (name, explicit mantissa bits, exponent of the smallest normal, largest finite value)
CACHE_FORMATS = (("float8_e4m3", 3, -6, 448.0), ("float8_e5m2", 2, -14, 57344.0))


def float8(x: torch.Tensor, mantissa: int, min_exp: int, largest: float, toward_zero: bool) -> torch.Tensor:
    """x rounded to a float8 format, saturating: to nearest (ties to even), or toward zero (the bits past
    the mantissa dropped, as vLLM's CPU cache writer does)."""
    a = x.double().abs().clamp(max=largest)
    exp = torch.floor(torch.log2(a.clamp(min=2.0**min_exp))).clamp(min=min_exp)
    step = torch.exp2(exp - mantissa)
    q = torch.floor(a / step) if toward_zero else torch.round(a / step)
    return torch.sign(x.double()) * (q * step).clamp(max=largest)


def cache_lowp(s: Site) -> Diagnosis | None:
    """The step's slots of the cache replayed from the candidate's own keys (k_rope) or values (v_proj),
    rounded to a float8 format (to nearest, else toward zero): named when that reproduces what its cache
    holds within the noise."""
    x, c = s.cand("k_rope" if s.op == "k_cache" else "v_proj"), s.cand()
    if x is None or c is None:
        return None
    positions = s.positions()[0]
    if c.shape[2] <= int(positions[-1]):
        return None
    x = x.reshape(*x.shape[:2], c.shape[1], -1).transpose(1, 2)  # [B,nKV,T,D], as the cache holds them
    c = c[:, :, positions]
    what = "keys" if s.op == "k_cache" else "values"
    for name, bits, min_exp, largest in CACHE_FORMATS:
        for toward_zero in (False, True):
            how = "toward zero (the bits past its mantissa dropped)" if toward_zero else "to nearest"
            found = s.explained(
                "cache_lowp",
                f"{s.name()} holds the step's {what} rounded {how} to {name}",
                f"the KV cache keeps {what} in {name} ({bits} mantissa bits, {s.dtype_name} has "
                f"{round(-math.log2(s.eps))}): a quantized cache, not a bug in the op; attention reads the "
                "rounded values from here on",
                float8(x, bits, min_exp, largest, toward_zero),
                {"format": name, "rounding": "toward_zero" if toward_zero else "nearest"},
                cand=c,
                unchanged=x.double(),  # Qwen3's cache holds the step's keys/values as they are
            )
            if found is not None:
                return found
    return None


def attention_rebuilt(s: Site) -> Diagnosis | None:
    """For engines that expose no attention matrices: recompute attn_out from the candidate's own q_rope,
    k_cache and v_cache, the Qwen3 way, with one known slip at a time, and over another layer's cache."""
    q, k, v, c = s.cand("q_rope"), s.cand("k_cache"), s.cand("v_cache"), s.cand()
    if q is None or k is None or v is None or s.cand("attn_probs") is not None:
        return None
    cfg, pos = s.cfg, s.positions()
    right = {"kv_of_head": s.kv_of_head, "scale": cfg.head_dim**-0.5}
    as_qwen3 = rel(c, attention(q, k, v, pos, **right))
    if not as_qwen3 > s.tol:
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
    qwen3 = attention(q, k, v, pos, **right)
    tried = [(attention(q, k, v, pos, **(right | change)), sig, what, why, {}) for sig, change, what, why in slips]
    for layer in range(cfg.num_hidden_layers):
        kl, vl = s.operand(tap_name("k_cache", layer)), s.operand(tap_name("v_cache", layer))
        if layer != s.layer and kl is not None and vl is not None and kl.shape == k.shape:
            tried.append(
                (
                    attention(q, kl, vl, pos, **right),
                    "input_substituted",
                    f"layer {layer}'s k_cache and v_cache",
                    f"layer {s.layer} attends over layer {layer}'s cache; read layer {s.layer}'s",
                    {"operand": tap_name("k_cache", layer), "expected": tap_name("k_cache", s.layer)},
                )
            )
    replay, sig, what, why, ev = min(tried, key=lambda t: ranked(rel(c, t[0])))
    return s.explained(
        sig,
        f"{s.name()} is what the candidate's own q_rope, k_cache and v_cache give with {what} "
        f"(attending as Qwen3 leaves {as_qwen3:.2g})",
        why,
        replay,
        ev | {"residual_as_qwen3": as_qwen3, "rebuilt_from": "attn_out"},
        unchanged=qwen3,
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
    n = ulps(c, base, act) if base is not None else math.nan
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


def summation_order(s: Site) -> Diagnosis | None:
    """Does the candidate's matmul sum its products in sequence, rounding each partial sum to the activation
    dtype? Replayed on its own input for a sample of tokens: named when at least 90% of its values are that
    replay's bit for bit, more than match the reference. Within the noise only (`explain_rounding`)."""
    if not is_linear(s) or s.op == "logits":
        return None
    x, w, base = s.cand(s.input_op), s.weight(MATMUL_MODULE[s.op] + ".weight"), s.base()
    if x is None or w is None or base is None:
        return None
    act, rows = s.src.dtype, s.tokens()
    c, base = s.cand()[:, rows], base[:, rows]
    share = float((c == accumulate_lowp(x[:, rows].to(act), w.to(act)).double()).double().mean())
    if share < 0.9 or share <= float((c == base).double().mean()):
        return None
    n = ulps(c, base, act)
    why = (
        "another summation order, not a bug"
        if s.eps < 1e-4
        else f"it accumulates in {s.dtype_name}, within the noise at this reduction length; accumulate in float32"
    )
    return Diagnosis(
        "rounding_order",
        f"{s.name()} differs from the reference by up to {ulps_phrase(n, s.dtype_name)}, and {share:.0%} of "
        f"its values are, bit for bit, its own input's products summed in sequence in {s.dtype_name} (replayed "
        f"on {len(rows)} tokens): {why}",
        {"max_ulps": n, "share_matching_sequential_sum": share, "tokens_replayed": len(rows)},
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
    Hypothesis(("cache_lowp",), ("k_cache", "v_cache"), cache_lowp),
    Hypothesis(("nonfinite",), ("*",), nonfinite, nonfinite=True),
)
