"""Parameter fits: an op's scalar parameters fitted to the candidate's tensor (embedding and score scale,
RMSNorm eps, RoPE theta and position offset, softmax temperature). A fit is stated when the config's value
leaves the error outside the noise, the fitted one brings it inside, and the two differ."""

from __future__ import annotations

import math
from typing import Callable

import torch

from qwen3dbg.diff.diagnosis.hypothesis import NORM_OPS, Hypothesis, norm_input, norm_weight_name, replay_floor
from qwen3dbg.diff.diagnosis.replay import attention, rms_norm, rope_angles, rotate, scores
from qwen3dbg.diff.diagnosis.site import FIT_HEADS, Diagnosis, Site
from qwen3dbg.diff.metrics import fit_scale, ranked, rel
from qwen3dbg.tapstore.store import masked


def _sci(x: float) -> str:
    """1e+06 -> 1e6, 12345.6 -> 1.2e4."""
    return f"{x:.2g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _name_factor(a: float, factors: dict[str, float]) -> str | None:
    return next((label for label, f in factors.items() if abs(a / f - 1) < 0.01), None)


def golden_section(f: Callable[[float], float], lo: float, hi: float, rounds: int = 30) -> float:
    """The minimum of a unimodal f on [lo, hi], one new probe a round."""
    g = (5**0.5 - 1) / 2
    m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
    r1, r2 = f(m1), f(m2)
    for _ in range(rounds):
        if r1 < r2:
            hi, m2, r2 = m2, m1, r1
            m1 = hi - g * (hi - lo)
            r1 = f(m1)
        else:
            lo, m1, r1 = m1, m2, r2
            m2 = lo + g * (hi - lo)
            r2 = f(m2)
    return (lo + hi) / 2


def embed_scaled(s: Site) -> Diagnosis | None:
    """embed = a x reference for one scalar a, named when it is sqrt(hidden) or its inverse."""
    c, r = s.cand(), s.base()
    a, _ = fit_scale(c, r)
    if abs(a - 1) <= s.tol:
        return None
    h = s.cfg.hidden_size
    label = _name_factor(a, {f"sqrt({h})": h**0.5, f"1/sqrt({h})": h**-0.5})
    named = f" = {label}" if label else ""
    return s.explained(
        "embed_scaled",
        f"embed = reference x {a:.6g}{named}",
        "embeddings are scaled; Qwen3 does not scale them",
        a * r,
        {"factor": a, "named": label},
    )


def scores_scaled(s: Site) -> Diagnosis | None:
    """Unmasked scores = a x reference, named when a is sqrt(head_dim) or its inverse."""
    c, r = s.cand(), s.base()
    valid = ~masked(r) & ~masked(c)
    a, _ = fit_scale(c[valid], r[valid])
    if abs(a - 1) <= s.tol:
        return None
    d = s.cfg.head_dim
    label = _name_factor(a, {f"sqrt(head_dim {d})": d**0.5, f"1/sqrt(head_dim {d})": d**-0.5})
    why = {
        None: "the scores are scaled",
        f"sqrt(head_dim {d})": "the 1/sqrt(head_dim) scale is missing",
        f"1/sqrt(head_dim {d})": "the 1/sqrt(head_dim) scale is applied twice",
    }[label]
    named = f" = {label}" if label else ""
    return s.explained(
        "scores_scaled",
        f"attn_scores = reference x {a:.4g}{named}",
        why,
        a * r[valid],
        {"factor": a, "named": label, "head_dim": d},
        cand=c[valid],
        unchanged=r[valid],
    )


def softmax_temperature(s: Site) -> Diagnosis | None:
    """attn_probs = softmax(a x the candidate's own scores): a fitted inverse temperature, fitted and judged on
    the query rows a fit looks at (`Site.fit_rows`: a softmax is per row) when the tap is large."""
    sc, p = s.cand("attn_scores"), s.cand()
    if sc is None:
        return None
    if (rows := s.fit_rows(p)) is not None:
        p, sc = p.index_select(2, rows), sc.index_select(2, rows)
    sc = sc.masked_fill(~torch.isfinite(sc), float("-inf"))
    qwen3 = sc.softmax(-1)
    if rel(p, qwen3) <= replay_floor(s):
        return None

    def resid(log_a: float) -> float:
        return ranked(rel(p, (sc * math.exp(log_a)).softmax(-1)))

    grid = [i * 0.25 for i in range(-16, 17)]
    log_a = golden_section(resid, min(grid, key=resid) - 0.25, min(grid, key=resid) + 0.25)
    a = math.exp(log_a)
    return s.explained(
        "softmax_temperature",
        f"attn_probs = softmax({a:.4g} x attn_scores)",
        f"the softmax has a temperature of {1 / a:.4g}; Qwen3 takes it of the scores as they are",
        (sc * a).softmax(-1),
        {"factor": a},
        cand=p,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def _position_drift(s: Site) -> tuple[float, float, int]:
    """Relative error of the candidate at the step's first position and its worst position."""
    c, r = s.cand(), s.base()  # [B,T,n,D]
    errs = [rel(c[:, t], r[:, t]) for t in range(c.shape[1])]
    worst = max(range(len(errs)), key=errs.__getitem__)
    return errs[0], errs[worst], int(s.positions()[0, worst])


def rope_fit(s: Site) -> Diagnosis | None:
    """Fit theta, the position offset and the channel pairing that turn the candidate's q_norm into its
    q_rope, on a sample of tokens (the last, farthest position included) and heads (~105 rotations)."""
    x, y = s.cand(s.input_op), s.cand()
    if x is None:
        return None
    idx = s.tokens()
    x, y, pos = x[:, idx, :FIT_HEADS], y[:, idx, :FIT_HEADS], s.positions()[:, idx]
    d, theta0 = s.cfg.head_dim, s.cfg.rope_theta

    def replay(log_theta: float, interleaved: bool = False, offset: int = 0) -> torch.Tensor:
        return rotate(x, rope_angles(pos + offset, d, 10**log_theta, interleaved))

    def resid(log_theta: float, interleaved: bool = False, offset: int = 0) -> float:
        return ranked(rel(y, replay(log_theta, interleaved, offset)))

    qwen3 = replay(math.log10(theta0))
    if rel(y, qwen3) <= replay_floor(s):
        return None
    e0, e_worst, p_worst = _position_drift(s)
    drift = (
        f"{s.op} matches at position {int(pos[0, 0])} (rel. error {e0:.1e}) and drifts with position "
        f"({e_worst:.2g} at position {p_worst})"
        if e0 <= s.tol
        else f"{s.op} differs from position {int(pos[0, 0])} on "
        f"(rel. error {e0:.2g}; {e_worst:.2g} at position {p_worst})"
    )
    ev = {"rel_err_first_position": e0, "rel_err_worst": e_worst, "worst_position": p_worst, "config_theta": theta0}
    grid = [2 + i * 0.1 for i in range(71)]  # log10 theta from 2 to 9
    best = min(grid, key=resid)
    fitted = golden_section(resid, best - 0.1, best + 0.1)
    theta = 10**fitted
    if abs(fitted - math.log10(theta0)) > 0.1 and (
        d_ := s.explained(
            "rope_theta",
            f"{drift}: the RoPE angles of theta ~ {_sci(theta)}",
            f"rope_theta is {_sci(theta)}, the config says {_sci(theta0)}",
            replay(fitted),
            ev | {"fitted_theta": theta},
            cand=y,
            unchanged=qwen3,
            floor=replay_floor(s),
        )
    ):
        return d_
    for offset in (1, -1):
        if d_ := s.explained(
            "rope_position_offset",
            f"{drift}: the rotation is that of position p{offset:+d}",
            f"RoPE positions are off by {offset:+d}",
            replay(math.log10(theta0), offset=offset),
            ev | {"position_offset": offset},
            cand=y,
            unchanged=qwen3,
            floor=replay_floor(s),
        ):
            return d_
    interleaved = replay(math.log10(theta0), True)
    r_inter = rel(y, interleaved)
    return s.explained(
        "rope_layout",
        f"{drift}: channels 2i and 2i+1 share a RoPE angle (cos/sin interleaved) while "
        f"rotate_half pairs channel i with i+{d // 2}",
        "cos/sin are concatenated on the wrong dim",
        interleaved,
        ev | {"residual_interleaved": r_inter},
        cand=y,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def norm_eps(s: Site) -> Diagnosis | None:
    """RMSNorm eps fitted per token (w x / y = sqrt(mean x^2 + eps)), its median replayed."""
    x, w, c = norm_input(s), s.weight_at(norm_weight_name(s)), s.cand()
    if x is None or w is None:
        return None
    eps0 = s.cfg.rms_norm_eps
    qwen3 = rms_norm(x, w, eps0)
    if rel(c, qwen3) <= replay_floor(s):
        return None
    t = s.tokens()
    xs, cs = x[:, t].reshape(-1, x.shape[-1]), c[:, t].reshape(-1, x.shape[-1])
    basis = w * xs
    scale = (cs * basis).sum(-1) / basis.pow(2).sum(-1)  # 1 / sqrt(ms + eps) per row
    ok = torch.isfinite(scale) & (scale > 0)
    if not bool(ok.any()):
        return None
    eps = float((scale[ok].pow(-2) - xs[ok].pow(2).mean(-1)).median())
    if not eps > 0 or abs(math.log(eps / eps0)) < math.log(1.5):
        return None
    return s.explained(
        "norm_eps",
        f"{s.name()} is an RMSNorm with eps ~ {_sci(eps)}",
        f"rms_norm_eps is {_sci(eps)}, the config says {_sci(eps0)}; use the config's",
        rms_norm(x, w, eps),
        {"fitted_eps": eps, "config_eps": eps0},
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def sliding_window(s: Site) -> Diagnosis | None:
    """Attention over the last W keys only, W fitted: attn_scores (masked where the window ends), or attn_out
    rebuilt from the candidate's own q_rope, k_cache and v_cache when it exposes no attention matrices. On a
    sample of query rows; a row at position p loses keys only when p >= W, so W is at most the first sampled
    position whose row leaves the noise, and is searched on a log grid below it, then refined."""
    q, k, v = s.cand("q_rope"), s.cand("k_cache"), s.cand("v_cache")
    if q is None or k is None or (s.op == "attn_out" and (v is None or s.cand("attn_probs") is not None)):
        return None
    t = s.tokens()
    pos, qt, scale = s.positions()[:, t], q[:, t], s.cfg.head_dim**-0.5
    c = s.cand()[:, t] if s.op == "attn_out" else s.cand()[:, :, t]

    def replay(window: int | None) -> torch.Tensor:
        if s.op == "attn_out":
            return attention(qt, k, v, pos, s.kv_of_head, scale, window=window)
        return scores(qt, k, pos, s.kv_of_head, scale, window=window)

    def row(x: torch.Tensor, i: int) -> torch.Tensor:
        return x[:, i] if s.op == "attn_out" else x[:, :, i]

    qwen3 = replay(None)
    off = [i for i in range(len(t)) if not rel(row(c, i), row(qwen3, i)) <= s.tol]
    if not off:
        return None
    top = int(pos[0, off[0]])
    if top < 1:
        return None

    def resid(w: int) -> float:
        return ranked(rel(c, replay(w)))

    grid = sorted({max(1, round(top * 2 ** (-i / 4))) for i in range(4 * max(1, top.bit_length()))} | {top})
    best = min(grid, key=resid)
    lo, hi = max((g for g in grid if g < best), default=1), min((g for g in grid if g > best), default=top)
    while hi - lo > 2:  # integer ternary search between the grid's neighbours of the best
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        lo, hi = (lo, m2) if resid(m1) <= resid(m2) else (m1, hi)
    w = min(range(lo, hi + 1), key=resid)
    # The first query the fitted window changes is position w, whether or not its row left the noise (the row
    # rule's first row is the first that did): the replay is checked on that row alone.
    at, first = w - int(s.positions()[0, 0]), ""
    evidence = {"window": w, "first_position_off": top, "rows_replayed": len(t), "first_position_changed": w}
    if 0 <= at < s.positions().shape[1]:
        one = torch.tensor([at])
        ci = s.cand()[:, one] if s.op == "attn_out" else s.cand()[:, :, one]
        pi, qi = s.positions()[:, one], q[:, one]
        fit, qwen3_fit = (
            rel(ci, attention(qi, k, v, pi, s.kv_of_head, scale, window=x))
            if s.op == "attn_out"
            else rel(ci, scores(qi, k, pi, s.kv_of_head, scale, window=x))
            for x in (w, None)
        )
        evidence |= {"fit_at_first_changed": fit, "qwen3_at_first_changed": qwen3_fit}
        first = (
            f"; at position {w}, the first query it changes, the window's replay reproduces the candidate's row "
            f"(rel. {fit:.2g}, noise floor {s.tol:.2g}; Qwen3's replay {qwen3_fit:.2g})"
            if fit <= s.tol
            else f"; at position {w}, the first query it changes, the window's replay is {fit:.2g} rel. off the "
            f"candidate's row, Qwen3's {qwen3_fit:.2g} (noise floor {s.tol:.2g})"
        )
    return s.explained(
        "sliding_window",
        f"{s.name()} attends over the last {w} keys only: queries at position {w} and later lose their oldest "
        f"keys (first sampled query off: position {top}){first}",
        "a sliding window is applied; Qwen3 attends to every earlier key",
        replay(w),
        evidence,
        cand=c,
        unchanged=qwen3,
    )


HYPOTHESES = (
    Hypothesis(("embed_scaled",), ("embed",), embed_scaled),
    Hypothesis(("scores_scaled",), ("attn_scores",), scores_scaled),
    Hypothesis(("softmax_temperature",), ("attn_probs",), softmax_temperature),
    Hypothesis(("norm_eps",), NORM_OPS, norm_eps),
    Hypothesis(("rope_theta", "rope_position_offset", "rope_layout"), ("q_rope", "k_rope"), rope_fit),
    Hypothesis(("sliding_window",), ("attn_scores", "attn_out"), sliding_window),
)
