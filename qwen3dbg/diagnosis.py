"""Named bug signatures, computed from the tensors alone (never from an implementation's name).

`diagnose` runs every check whose ops include the first divergent tap; a check reads that tap and
its neighbours (the op's inputs, the same tap at the prefill) and either names a bug with the numbers
behind it or returns None. Checks test a hypothesis: re-run the op under the suspected bug on the
candidate's OWN inputs and see whether that reproduces the candidate's output to within the noise
of the tap. `explain_rounding` words differences that stay inside the noise.

Shapes: B batch, T tokens of the step, S cache slots, nH/nKV heads, D head_dim, N output channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Protocol

import torch

from qwen3dbg.config import Qwen3Config
from qwen3dbg.dtypes import dtype_name
from qwen3dbg.reference.qwen3 import apply_rope, causal_mask
from qwen3dbg.store import StepInfo, masked
from qwen3dbg.taps import inputs_of, parse_tap_name, tap_name


@dataclass(frozen=True)
class Diagnosis:
    signature: str  # stable id
    message: str  # one sentence with the evidence in numbers
    evidence: dict = field(default_factory=dict)  # JSON-serialisable numbers behind the message


class TapSource(Protocol):
    """What the differ hands in: every side's taps by (step, name), and the checkpoint."""

    config: Qwen3Config
    steps: list[StepInfo]
    dtype: torch.dtype  # dtype under test

    def ref(self, step: int, name: str) -> torch.Tensor | None: ...

    def cand(self, step: int, name: str) -> torch.Tensor | None: ...

    def gold(self, step: int, name: str) -> torch.Tensor | None: ...

    def weight(self, name: str) -> torch.Tensor | None: ...


# ---- pure math ------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 over the entries where b is finite (inf when a is not finite there)."""
    a, b = a.double(), b.double()
    ok = torch.isfinite(b)
    if not bool(torch.isfinite(a[ok]).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(b[ok]))
    num = float(torch.linalg.vector_norm((a - b)[ok]))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def fit_scale(c: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """Least-squares a with c ~ a * r over finite entries of r; returns (a, ||c - a r|| / ||c||)."""
    ok = torch.isfinite(r) & torch.isfinite(c)
    c, r = c[ok].double(), r[ok].double()
    rr = float(r @ r)
    if rr == 0:
        return 1.0, math.inf
    a = float(c @ r) / rr
    return a, rel(a * r, c)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, interleaved: bool) -> torch.Tensor:
    """positions [B,T] -> angles [B,T,D] in float64. Halves (Qwen3): channel i and i + D/2 share
    frequency i; interleaved (GPT-J): channels 2i and 2i+1 share frequency i."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions.double()[..., None] * inv_freq
    return freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B,T,n,D] by angles [B,T,D], in float64."""
    return apply_rope(x.double(), angles.cos(), angles.sin())


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |a - b| over entries finite on both sides, in units in the last place of `dtype` at b's
    magnitude, where magnitudes under b's RMS count as the RMS (a near-zero element inherits its
    neighbours' absolute error)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    if b.numel() == 0:
        return 0.0
    mag = b.abs().clamp_min(float(b.pow(2).mean().sqrt()) or torch.finfo(dtype).tiny)
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag)))
    return float(((a - b).abs() / spacing).max())


def accumulate_lowp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K].T with every product and running sum rounded to x's dtype."""
    acc = torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    for k in range(x.shape[-1]):
        acc = acc + x[..., k, None] * w[:, k]
    return acc


def scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, kv_of_head: list[int], scale: float,
           causal: bool = True) -> torch.Tensor:
    """Attention scores in float64 from q [B,T,nH,D], a key cache [B,nKV,S,D] and query positions [B,T]
    -> [B,nH,T,S], future keys -inf when causal; query head h reads kv head kv_of_head[h]."""
    q, k = q.double().transpose(1, 2), k.double()[:, kv_of_head]
    out = q @ k.transpose(2, 3) * scale
    return out.masked_fill(causal_mask(positions, k.shape[2]), float("-inf")) if causal else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_of_head: list[int],
              scale: float, causal: bool = True, softmax_dim: int = -1) -> torch.Tensor:
    """Attention in float64 (see `scores`; v [B,nKV,S,D]) -> context [B,T,nH*D]. The knobs are where bugs live."""
    probs = scores(q, k, positions, kv_of_head, scale, causal).softmax(softmax_dim)
    out = probs @ v.double()[:, kv_of_head]  # [B,nH,T,D]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


#: the most tokens and heads a fit or a simulation looks at
FIT_TOKENS, FIT_HEADS = 16, 4


def sample(n: int, k: int = FIT_TOKENS) -> torch.Tensor:
    """At most k indices spread evenly over range(n), first and last included."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


# ---- where a check looks --------------------------------------------------------------------------

def _widen(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tap in float64 for the checks, its masked attention entries as -inf (their canonical form): an
    additive mask stored as finfo(dtype).min would no longer read as masked once widened."""
    if t is None:
        return None
    return t.masked_fill(masked(t), float("-inf")).double() if t.is_floating_point() else t.double()


@dataclass
class Site:
    """One tap of one step under suspicion, with shortcuts to its neighbours (ops of the same layer)."""

    src: TapSource
    step: int
    layer: int | None
    op: str
    #: (side, step, name) -> widened tensor: every check reads the same few taps, each from disk once
    _reads: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def cfg(self) -> Qwen3Config:
        return self.src.config

    @property
    def eps(self) -> float:
        return torch.finfo(self.src.dtype).eps

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.src.dtype)

    def name(self, op: str | None = None) -> str:
        return tap_name(op or self.op, self.layer)

    def _read(self, side: str, op: str | None, step: int | None) -> torch.Tensor | None:
        key = (side, self.step if step is None else step, self.name(op))
        if key not in self._reads:
            s, name = key[1:]
            if side == "cand":
                t = self.src.cand(s, name)
            else:  # the reference in the dtype under test, else the golden
                t = self.src.ref(s, name)
                t = self.src.gold(s, name) if t is None else t
            self._reads[key] = _widen(t)
        return self._reads[key]

    def cand(self, op: str | None = None, step: int | None = None) -> torch.Tensor | None:
        return self._read("cand", op, step)

    def base(self, op: str | None = None, step: int | None = None) -> torch.Tensor | None:
        """The reference side of a comparison: the reference in the dtype under test, else the golden."""
        return self._read("base", op, step)

    @cached_property
    def tol(self) -> float:
        """How close a hypothesis must reproduce the candidate: 4x the reference's own relative
        error to fp64 at this tap, and never under 4 ulps of the dtype."""
        r, g = self.src.ref(self.step, self.name()), self.src.gold(self.step, self.name())
        noise = rel(r, g) if r is not None and g is not None else 0.0
        return 4 * max(noise, self.eps)

    def positions(self) -> torch.Tensor:
        return torch.tensor(self.src.steps[self.step].positions)

    @property
    def kv_of_head(self) -> list[int]:
        """Qwen3's GQA mapping: query head h reads kv head h // n_rep."""
        return [h // self.cfg.n_rep for h in range(self.cfg.num_attention_heads)]

    @property
    def input_op(self) -> str:
        """The op this tap reads (its first input in the schema's graph), within the same layer."""
        return parse_tap_name(inputs_of(self.name(), self.cfg)[0])[1]

    def weight_name(self, module: str) -> str:
        """The on-disk name of this layer's `module` tensor (`self_attn.q_norm.weight`)."""
        return f"model.layers.{self.layer}.{module}" if self.layer is not None else module

    def weight(self, module: str) -> torch.Tensor | None:
        t = self.src.weight(self.weight_name(module))
        return None if t is None else t.double()


Check = Callable[[Site], "Diagnosis | None"]


# ---- the signatures, one per bug family -----------------------------------------------------------

def _name_factor(a: float, factors: dict[str, float]) -> str | None:
    return next((label for label, f in factors.items() if abs(a / f - 1) < 0.01), None)


def embed_scaled(s: Site) -> Diagnosis | None:
    """embed = a x reference for one scalar a, named when it is sqrt(hidden) or its inverse."""
    c, r = s.cand(), s.base()
    a, resid = fit_scale(c, r)
    if resid > s.tol or abs(a - 1) <= s.tol:
        return None
    h = s.cfg.hidden_size
    label = _name_factor(a, {f"sqrt({h})": h ** 0.5, f"1/sqrt({h})": h ** -0.5})
    named = f" = {label}" if label else ""
    return Diagnosis("embed_scaled", f"embed = reference x {a:.6g}{named}: embeddings are scaled, Qwen3 does not "
                     f"scale them (residual after the factor {resid:.1e})",
                     {"factor": a, "named": label, "residual": resid})


def scores_scaled(s: Site) -> Diagnosis | None:
    """Unmasked scores = a x reference, named when a is sqrt(head_dim) or its inverse."""
    c, r = s.cand(), s.base()
    valid = ~masked(r) & ~masked(c)
    a, resid = fit_scale(c[valid], r[valid])
    if resid > s.tol or abs(a - 1) <= s.tol:
        return None
    d = s.cfg.head_dim
    label = _name_factor(a, {f"sqrt(head_dim {d})": d ** 0.5, f"1/sqrt(head_dim {d})": d ** -0.5})
    why = {None: "the scores are scaled", f"sqrt(head_dim {d})": "the 1/sqrt(head_dim) scale is missing",
           f"1/sqrt(head_dim {d})": "the 1/sqrt(head_dim) scale is applied twice"}[label]
    named = f" = {label}" if label else ""
    return Diagnosis("scores_scaled", f"attn_scores = reference x {a:.4g}{named}: {why}",
                     {"factor": a, "named": label, "residual": resid, "head_dim": d})


#: matmul taps and the checkpoint module holding their weight (and any bias a converter left beside it)
_MATMUL_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "o_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
                  "mlp.out": "mlp.down_proj", "moe.router_logits": "mlp.gate", "logits": "lm_head"}


def extra_bias(s: Site) -> Diagnosis | None:
    """cand - reference is the same vector at every token; named after an unused checkpoint bias it equals."""
    c, r = s.cand(), s.base()
    d = (c - r).reshape(-1, c.shape[-1])  # [tokens, N]
    if d.shape[0] < 2 or rel(c, r) <= s.tol:
        return None
    offset = d.mean(0)
    spread = float(torch.linalg.vector_norm(d - offset) / torch.linalg.vector_norm(d))
    if spread > 0.1:
        return None
    rms = float(offset.pow(2).mean().sqrt())
    ev = {"offset_rms": rms, "spread_across_tokens": spread, "tokens": d.shape[0]}
    msg = (f"{s.name()} = reference + a constant per-channel offset (rms {rms:.3g}, varying {spread:.1%} across "
           f"{d.shape[0]} tokens): an extra bias")
    bias_name = f"{_MATMUL_MODULE.get(s.op, s.op)}.bias"
    bias = s.weight(bias_name)
    if bias is not None and bias.shape == offset.shape and rel(offset, bias) < 0.05:
        full = s.weight_name(bias_name)
        ev |= {"bias_tensor": full, "offset_vs_bias_rel": rel(offset, bias)}
        msg += f"; it equals the checkpoint's {full}, which attention_bias {str(s.cfg.attention_bias).lower()} leaves unused"
    return Diagnosis("extra_bias", msg, ev)


def norm_over_all_heads(s: Site) -> Diagnosis | None:
    """Undo the weight: each head's RMS should be 1; a norm over all heads makes only their joint RMS 1."""
    c, w, x = s.cand(), s.weight(f"self_attn.{s.op}.weight"), s.cand(s.input_op)
    if w is None or x is None:
        return None
    x = x.reshape(c.shape)  # [B,T,n,D], from the projection's [B,T,n*D]
    xhat = c / w  # what the norm produced before its weight

    def rms_after_norm(ms: torch.Tensor) -> torch.Tensor:
        """The RMS an RMSNorm leaves on values of mean square ms: just under 1, by its eps."""
        return (ms / (ms + s.cfg.rms_norm_eps)).sqrt()

    per_head = xhat.pow(2).mean(-1).sqrt()  # [B,T,n]
    joint = xhat.flatten(-2).pow(2).mean(-1).sqrt()  # [B,T]
    per_head_off = float((per_head - rms_after_norm(x.pow(2).mean(-1))).abs().max())
    expected = rms_after_norm(x.flatten(-2).pow(2).mean(-1))
    lo, hi = float(per_head.min()), float(per_head.max())
    if float((joint - expected).abs().max()) > s.tol or per_head_off <= s.tol:
        return None
    n = c.shape[-2]
    return Diagnosis("norm_axis", f"{s.op} normalised over all {n} heads jointly: the RMS of {s.op}/weight per head "
                     f"ranges {lo:.3f}..{hi:.3f} but over all heads it is {float(joint.mean()):.4f}; "
                     f"Qwen3 normalises each head over head_dim {c.shape[-1]}",
                     {"per_head_rms_min": lo, "per_head_rms_max": hi, "joint_rms": float(joint.mean()),
                      "joint_rms_expected": float(expected.mean()), "heads": n})


def _ulps(n: float, dtype_name: str) -> str:
    return f"{n:.0f} {dtype_name} ulp" + ("" if round(n) == 1 else "s")


def _sci(x: float) -> str:
    """1e+06 -> 1e6, 12345.6 -> 1.2e4."""
    return f"{x:.2g}".replace("e+0", "e").replace("e+", "e")


def _position_drift(s: Site) -> tuple[float, float, int]:
    """Relative error of the candidate at the step's first position and its worst position."""
    c, r = s.cand(), s.base()  # [B,T,n,D]
    errs = [rel(c[:, t], r[:, t]) for t in range(c.shape[1])]
    worst = max(range(len(errs)), key=errs.__getitem__)
    return errs[0], errs[worst], int(s.positions()[0, worst])


def rope_angles_wrong(s: Site) -> Diagnosis | None:
    """Fit theta (and the channel pairing) that turns the candidate's q_norm into its q_rope, on a
    sample of tokens (the last, farthest position included) and heads: the fit runs ~105 rotations."""
    x, y = s.cand(s.input_op), s.cand()
    if x is None:
        return None
    idx = sample(x.shape[1])
    x, y, pos = x[:, idx, :FIT_HEADS], y[:, idx, :FIT_HEADS], s.positions()[:, idx]
    d, theta0 = s.cfg.head_dim, s.cfg.rope_theta
    if rel(rotate(x, rope_angles(pos, d, theta0, False)), y) <= s.tol:
        return None
    e0, e_worst, p_worst = _position_drift(s)
    drift = (f"{s.op} matches at position {int(pos[0, 0])} (rel. error {e0:.1e}) and drifts with position "
             f"({e_worst:.2g} at position {p_worst})" if e0 <= s.tol else
             f"{s.op} differs from position {int(pos[0, 0])} on (rel. error {e0:.2g}; {e_worst:.2g} at position {p_worst})")
    ev = {"rel_err_first_position": e0, "rel_err_worst": e_worst, "worst_position": p_worst,
          "config_theta": theta0}

    def resid(log_theta: float, interleaved: bool = False) -> float:
        return rel(rotate(x, rope_angles(pos, d, 10 ** log_theta, interleaved)), y)

    grid = [2 + i * 0.1 for i in range(71)]  # log10 theta from 2 to 9
    best = min(grid, key=resid)
    g = (5 ** 0.5 - 1) / 2  # golden-section refinement to float32 precision of theta: one new probe a round
    lo, hi = best - 0.1, best + 0.1
    m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
    r1, r2 = resid(m1), resid(m2)
    for _ in range(30):
        if r1 < r2:
            hi, m2, r2 = m2, m1, r1
            m1 = hi - g * (hi - lo)
            r1 = resid(m1)
        else:
            lo, m1, r1 = m1, m2, r2
            m2 = lo + g * (hi - lo)
            r2 = resid(m2)
    fitted, r_fit = 10 ** ((lo + hi) / 2), resid((lo + hi) / 2)
    if r_fit <= s.tol and abs(math.log10(fitted / theta0)) > 0.1:
        return Diagnosis("rope_theta", f"{drift}: RoPE angles; fitted theta ~ {_sci(fitted)} (residual {r_fit:.1e}), "
                         f"config says {_sci(theta0)}", ev | {"fitted_theta": fitted, "residual": r_fit})
    for offset in (1, -1):
        r_off = rel(rotate(x, rope_angles(pos + offset, d, theta0, False)), y)
        if r_off <= s.tol:
            return Diagnosis("rope_position_offset", f"{drift}: the rotation is that of position p{offset:+d} "
                             f"(residual {r_off:.1e}): RoPE positions off by {offset:+d}",
                             ev | {"position_offset": offset, "residual": r_off})
    r_inter = resid(math.log10(theta0), True)
    if r_inter <= s.tol:
        return Diagnosis("rope_layout", f"{drift}: channels 2i and 2i+1 share a RoPE angle (cos/sin interleaved, "
                         f"residual {r_inter:.1e}) while rotate_half pairs channel i with i+{d // 2}: cos/sin "
                         "concatenated on the wrong dim", ev | {"residual_interleaved": r_inter})
    if e0 <= s.tol < e_worst:
        return Diagnosis("rope_position", f"{drift}: RoPE angles, though no single theta or channel layout "
                         f"explains them (best theta {_sci(fitted)} leaves {r_fit:.1e})",
                         ev | {"fitted_theta": fitted, "residual": r_fit})
    return None


def cache_off_by_one(s: Site) -> Diagnosis | None:
    """At decode, with the prefill's cache right: slots that hold the reference's neighbour slot, or nothing."""
    if s.step == 0:
        return None
    c, r = s.cand(), s.base()  # [B,nKV,S,D]
    prefill = s.cand(step=0), s.base(step=0)
    if any(t is None for t in prefill) or rel(*prefill) > s.tol:
        return None
    scale = float(torch.linalg.vector_norm(r)) / r.shape[2] ** 0.5
    slot_err = [float(torch.linalg.vector_norm(c[:, :, j] - r[:, :, j])) / scale for j in range(r.shape[2])]
    bad = [j for j, e in enumerate(slot_err) if e > s.tol]
    if not bad:
        return None
    for shift in (1, -1):
        moved = [j for j in bad if 0 <= j + shift < r.shape[2]
                 and rel(c[:, :, j], r[:, :, j + shift]) <= s.tol]
        empty = [j for j in bad if float(c[:, :, j].abs().max()) == 0]
        if moved and sorted(moved + empty) == bad:
            where = "one slot early" if shift == 1 else "one slot late"
            return Diagnosis("cache_off_by_one",
                             f"prefill agrees, decode step {s.step} diverges: {s.op} slot {moved[-1]} holds the entry "
                             f"the reference has at slot {moved[-1] + shift}"
                             + (f", slot {empty[-1]} is empty" if empty else "")
                             + f": cache off-by-one (entries written {where})",
                             {"step": s.step, "shift": shift, "moved_slots": moved, "empty_slots": empty})
    return None


def causal_mask_missing(s: Site) -> Diagnosis | None:
    """Score entries of keys after the query's position that are not masked."""
    sc = s.cand("attn_scores")
    if sc is None:
        return None
    future = causal_mask(s.positions(), sc.shape[-1]).expand_as(sc)  # [B,nH,T,S]
    reached = future & ~masked(sc)
    if not bool(reached.any()):
        return None
    ev = {"future_entries": int(future.sum()), "reached": int(reached.sum())}
    msg = f"attention reaches future positions: {ev['reached']} of {ev['future_entries']} future (query < key) " \
          "score entries are not masked"
    probs = s.cand("attn_probs")
    if probs is not None:
        ev["future_mass"] = float(probs[future].sum() / probs.sum())
        msg += f" and carry {ev['future_mass']:.0%} of the attention mass"
    return Diagnosis("causal_mask_missing", msg + ": causal mask missing", ev)


def gqa_mapping(s: Site) -> Diagnosis | None:
    """For each query head, the kv head whose keys (from the candidate's own cache) give its scores."""
    q, k, sc = s.cand("q_rope"), s.cand("k_cache"), s.cand("attn_scores")
    c = s.cfg
    if q is None or k is None or c.n_rep == 1:
        return None
    valid = ~masked(sc)  # [B,nH,T,S]
    every_head_reads = [scores(q, k, s.positions(), [g] * c.num_attention_heads, c.head_dim ** -0.5, causal=False)
                        for g in range(c.num_key_value_heads)]
    mapping, resid = [], []
    for h in range(c.num_attention_heads):
        errs = [rel(sc[:, h][valid[:, h]], hyp[:, h][valid[:, h]]) for hyp in every_head_reads]
        g = min(range(len(errs)), key=errs.__getitem__)
        mapping.append(g)
        resid.append(errs[g])
    expected = s.kv_of_head
    if mapping == expected or max(resid) > s.tol:
        return None
    modulo = [h % c.num_key_value_heads for h in range(c.num_attention_heads)]
    ev = {"mapping": mapping, "expected": expected, "residual": max(resid)}
    if mapping == modulo:
        return Diagnosis("gqa_modulo", f"heads h and h+{c.num_key_value_heads} share keys: query heads read kv heads "
                         f"{mapping} (h % {c.num_key_value_heads}), the config implies {expected} "
                         f"(h // {c.n_rep}): GQA head mapping uses modulo", ev)
    return Diagnosis("gqa_mapping", f"query heads read kv heads {mapping}, the config implies {expected} "
                     f"(h // {c.n_rep}): GQA head mapping is wrong", ev)


def softmax_not_normalised(s: Site) -> Diagnosis | None:
    """Rows of probabilities that do not sum to 1 over keys; over the query axis if columns do."""
    p = s.cand()  # [B,nH,T,S]
    rows = p.sum(-1)
    row_err = float((rows - 1).abs().max())
    if row_err <= s.tol:
        return None
    ev = {"row_sum_min": float(rows.min()), "row_sum_max": float(rows.max())}
    msg = f"rows of attn_probs do not sum to 1 over keys (they range {ev['row_sum_min']:.3g}..{ev['row_sum_max']:.3g})"
    cols = p.sum(-2)[p.amax(-2) > 0]  # key columns that any query sees
    if p.shape[-2] > 1 and float((cols - 1).abs().max()) <= s.tol:
        return Diagnosis("softmax_axis", msg + " while every column sums to 1 over queries: softmax taken over the "
                         "query axis instead of the key axis", ev | {"col_sum_err": float((cols - 1).abs().max())})
    return Diagnosis("softmax_not_normalised", msg, ev)


def softmax_overflow(s: Site) -> Diagnosis | None:
    """NaN/inf born in the softmax: its scores are finite but pass log(max) of the dtype. Where the
    candidate exposes no scores (its first NaN is then attn_out), they are rebuilt from q_rope and k_cache."""
    sc, source = s.cand("attn_scores"), "its input attn_scores is"
    if sc is None:
        q, k = s.cand("q_rope"), s.cand("k_cache")
        if q is None or k is None:
            return None
        sc = scores(q, k, s.positions(), s.kv_of_head, s.cfg.head_dim ** -0.5)
        source = "the scores its q_rope and k_cache give are"
    live = sc[~masked(sc)]
    limit = math.log(torch.finfo(s.src.dtype).max)
    top = float(live.max())
    if not bool(torch.isfinite(live).all()) or top <= limit:
        return None
    out = s.cand()
    bad = int((~torch.isfinite(out)).sum())
    return Diagnosis("softmax_overflow", f"NaN/inf first produced by {s.name()} in {s.dtype_name} ({bad} of "
                     f"{out.numel()} values) while {source} finite with max {top:.4g} > log(max {s.dtype_name}) = "
                     f"{limit:.2f}: softmax without max subtraction overflows exp",
                     {"nonfinite": bad, "max_score": top, "exp_limit": limit})


def transpose_before_reshape(s: Site) -> Diagnosis | None:
    """attn_out read back as [B,nH,T,D] and transposed equals the reference."""
    c, r = s.cand(), s.base()  # [B,T,nH*D]
    B, T, _ = c.shape
    if T == 1:
        return None
    undone = c.reshape(B, -1, T, s.cfg.head_dim).transpose(1, 2).reshape(B, T, -1)
    as_is, fixed = rel(c, r), rel(undone, r)
    if fixed > s.tol:
        return None
    return Diagnosis("transpose_before_reshape", f"attn_out is a permutation of the reference: read as [B,nH,T,D] "
                     f"and transposed to [B,T,nH,D] it matches (rel. error {fixed:.1e}, as is {as_is:.2g}): "
                     "heads and tokens are not transposed back before the reshape",
                     {"rel_err_as_is": as_is, "rel_err_transposed": fixed})


def moe_weights_normalisation(s: Site) -> Diagnosis | None:
    """Top-k weights that sum to 1 per token exactly when norm_topk_prob says they must not, or vice versa."""
    c, r = s.cand(), s.base()  # [B,T,k]
    cs, rs = c.sum(-1), r.sum(-1)
    norm = s.cfg.norm_topk_prob
    sums_to_one = float((cs - 1).abs().max()) <= s.tol
    if sums_to_one == norm:
        return None
    ev = {"cand_sum_mean": float(cs.mean()), "ref_sum_mean": float(rs.mean()), "norm_topk_prob": norm}
    if norm:
        return Diagnosis("moe_topk_not_normalised", f"moe.topk_weights sum to {ev['cand_sum_mean']:.3g} per token on "
                         "average though norm_topk_prob is true: the top-k weights are not renormalised", ev)
    return Diagnosis("moe_topk_softmax", f"moe.topk_weights sum to 1 per token though norm_topk_prob is false "
                     f"(reference: {ev['ref_sum_mean']:.3g} on average, the top-k share of a softmax over all "
                     f"{s.cfg.num_experts} experts): softmax over the top-k logits only, or a renormalisation", ev)


def attention_rebuilt(s: Site) -> Diagnosis | None:
    """For engines that expose no attention matrices: recompute attn_out from the candidate's own
    q_rope, k_cache and v_cache, the Qwen3 way and with one known bug at a time."""
    q, k, v, c = s.cand("q_rope"), s.cand("k_cache"), s.cand("v_cache"), s.cand()
    if q is None or k is None or v is None:
        return None
    cfg, pos = s.cfg, s.positions()
    right = {"kv_of_head": s.kv_of_head, "scale": cfg.head_dim ** -0.5}
    as_qwen3 = rel(attention(q, k, v, pos, **right), c)
    if as_qwen3 <= s.tol:
        return None
    modulo = [h % cfg.num_key_value_heads for h in range(cfg.num_attention_heads)]
    bugs = [("causal_mask_missing", {"causal": False}, "no causal mask: attention reaches future positions"),
            ("scores_scaled", {"scale": 1.0}, "no 1/sqrt(head_dim) scale: the scale is missing"),
            ("softmax_axis", {"softmax_dim": -2}, "the softmax over queries: softmax taken over the wrong axis")]
    if modulo != right["kv_of_head"]:
        bugs.append(("gqa_modulo", {"kv_of_head": modulo},
                     f"query head h reading kv head h % {cfg.num_key_value_heads}: GQA head mapping uses modulo"))
    for signature, change, what in bugs:
        resid = rel(attention(q, k, v, pos, **(right | change)), c)
        if resid <= s.tol:
            return Diagnosis(signature, f"{s.name()} is what the candidate's own q_rope, k_cache and v_cache give with "
                             f"{what} (residual {resid:.1e}; attending as Qwen3 leaves {as_qwen3:.2g})",
                             {"residual": resid, "residual_as_qwen3": as_qwen3, "rebuilt_from": "attn_out"})
    return None


def _norm_input(s: Site) -> torch.Tensor | None:
    """The candidate's input of a norm tap (which may sit in the previous layer), shaped like its output."""
    x = s.src.cand(s.step, inputs_of(s.name(), s.cfg)[0])
    return None if x is None else x.double().reshape(s.cand().shape)


_NORM_WEIGHT = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
                "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
                "final_norm": "model.norm.weight"}


def amplification(src: TapSource, tap: str) -> float:
    """How much what follows a rounding magnifies it: transformers casts a normalised value and THEN
    multiplies by the RMSNorm weight, so a rounding difference at a norm leaves it max|weight| times
    larger (k_norm ~96.5 in released Qwen3). 1 for every other op."""
    layer, op = parse_tap_name(tap)
    if op not in _NORM_WEIGHT:
        return 1.0
    w = src.weight(_NORM_WEIGHT[op] if layer is None else f"model.layers.{layer}.{_NORM_WEIGHT[op]}")
    return 1.0 if w is None else max(1.0, float(w.abs().max()))


def rounding_point(s: Site) -> Diagnosis | None:
    """Does the candidate round RMSNorm after the weight (fused) where the reference rounds before?"""
    x, w, c = _norm_input(s), s.weight(_NORM_WEIGHT[s.op]), s.cand()
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
    return Diagnosis("rounding_point", f"{s.name()} differs by up to {_ulps(n, s.dtype_name)}: the RMSNorm weight is "
                     f"applied before rounding here and after it in the reference{amplified}",
                     {"max_ulps": n, "share_matching_fused": share_fused, "max_weight": wmax})


def norm_weight_wrong(s: Site) -> Diagnosis | None:
    """The candidate's norm output against its own input under the usual slips: no norm at all (a
    Qwen2 port skipping q_norm/k_norm), no weight, or Gemma's (1 + weight)."""
    x, w, c = _norm_input(s), s.weight(_NORM_WEIGHT[s.op]), s.cand()
    if x is None or w is None:
        return None
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.cfg.rms_norm_eps)
    slips = (("norm_skipped", x, f"{s.op}'s input unchanged: the RMSNorm is skipped"),
             ("norm_weight_missing", xhat, "the normalised input without the weight: RMSNorm weight not applied"),
             ("norm_weight_one_plus", (1 + w) * xhat, "the normalised input times (1 + weight), Gemma's convention; "
                                                     "Qwen3 multiplies by the weight itself"))
    for signature, hyp, what in slips:
        resid = rel(c, hyp)
        if resid <= s.tol:
            return Diagnosis(signature, f"{s.name()} is {what} (residual {resid:.1e})", {"residual": resid})
    return None


#: the matmuls the accumulation check replays (their input comes from the schema's graph); not the LM head
_LINEAR = {op: module for op, module in _MATMUL_MODULE.items() if op != "logits"}


def lowp_accumulation(s: Site) -> Diagnosis | None:
    """Replay the matmul on the candidate's own input, once summing in float64 and rounding once (what
    a float32 accumulator gives) and once rounding every product and partial sum to the activation
    dtype; name it when the two are far enough apart to tell and the candidate is within 2x of the second."""
    if s.eps < 1e-4 or s.op not in _LINEAR or (s.op == "mlp.out" and s.cfg.is_moe_layer(s.layer)):
        return None
    x, w, g = s.cand(s.input_op), s.weight(_LINEAR[s.op] + ".weight"), s.src.gold(s.step, s.name())
    if any(t is None for t in (x, w, g)):
        return None
    act = s.src.dtype
    rows = sample(x.shape[1])  # the replay rounds K times per output: a sample of tokens suffices
    x, w, g, c = x[:, rows].to(act), w.to(act), g[:, rows], s.cand()[:, rows]
    e_c = rel(c, g)
    e_right = rel((x.double() @ w.double().T).to(act), g)
    e_lp = rel(accumulate_lowp(x, w), g)
    if min(e_c, e_right) == 0 or not math.isfinite(e_c):
        return None
    off_lp, off_right = abs(math.log(e_c / e_lp)), abs(math.log(e_c / e_right))
    if e_lp < 2 * e_right or off_lp > math.log(2) or off_lp > off_right:
        return None
    k = x.shape[-1]
    return Diagnosis("lowp_accumulation", f"{s.name()} is {e_c:.2g} from fp64 (rel. L2); replayed on its own input, "
                     f"summing its {k} products per output in float32 gives {e_right:.2g} and in {s.dtype_name} "
                     f"{e_lp:.2g}: the matmul accumulates in {s.dtype_name}, not float32",
                     {"rel_err": e_c, "replay_fp32_rel_err": e_right, "replay_lowp_rel_err": e_lp,
                      "reduction_length": k})


def nonfinite(s: Site) -> Diagnosis | None:
    """The generic fallback for NaN/inf: where they first appear, and how many."""
    c, r = s.cand(), s.base()
    nan, inf = int(torch.isnan(c).sum()), int(torch.isinf(c).sum())
    return Diagnosis("nonfinite", f"NaN/inf first produced by {s.name()} in {s.dtype_name} ({nan} NaN, {inf} inf of "
                     f"{c.numel()} values) where the reference is finite (max |x| {float(r[torch.isfinite(r)].abs().max()):.4g})",
                     {"nan": nan, "inf": inf, "numel": c.numel()})


@dataclass(frozen=True)
class Signature:
    """A bug family: the stable ids it may report (what JSON consumers match on), the ops whose
    divergence it can explain, and the check that tests it. Checks of non-finite values run only where
    the candidate has NaN/inf that the reference has not; all the others only where it has none."""

    ids: tuple[str, ...]
    ops: tuple[str, ...]
    check: Check
    nonfinite: bool = False


NORM_OPS = ("attn_norm", "q_norm", "k_norm", "mlp_norm", "final_norm")

SIGNATURES: tuple[Signature, ...] = (  # most specific first: diagnose() returns fits in this order
    Signature(("softmax_overflow",), ("attn_probs", "attn_out"), softmax_overflow, nonfinite=True),
    Signature(("embed_scaled",), ("embed",), embed_scaled),
    Signature(("scores_scaled",), ("attn_scores",), scores_scaled),
    Signature(("extra_bias",), tuple(_MATMUL_MODULE), extra_bias),
    Signature(("norm_axis",), ("q_norm", "k_norm"), norm_over_all_heads),
    Signature(("rounding_point",), NORM_OPS, rounding_point),
    Signature(("norm_skipped", "norm_weight_missing", "norm_weight_one_plus"), NORM_OPS, norm_weight_wrong),
    Signature(("rope_theta", "rope_position_offset", "rope_layout", "rope_position"), ("q_rope", "k_rope"),
              rope_angles_wrong),
    Signature(("cache_off_by_one",), ("k_cache", "v_cache"), cache_off_by_one),
    Signature(("causal_mask_missing",), ("attn_scores", "attn_probs"), causal_mask_missing),
    Signature(("gqa_modulo", "gqa_mapping"), ("attn_scores",), gqa_mapping),
    Signature(("softmax_axis", "softmax_not_normalised"), ("attn_probs",), softmax_not_normalised),
    Signature(("transpose_before_reshape",), ("attn_out",), transpose_before_reshape),
    Signature(("causal_mask_missing", "scores_scaled", "softmax_axis", "gqa_modulo"), ("attn_out",),
              attention_rebuilt),
    Signature(("moe_topk_softmax", "moe_topk_not_normalised"), ("moe.topk_weights",), moe_weights_normalisation),
    Signature(("lowp_accumulation",), tuple(_LINEAR), lowp_accumulation),
    Signature(("nonfinite",), ("*",), nonfinite, nonfinite=True),
)
#: every id diagnose() can report; explain_rounding reports rounding_point or rounding_order
SIGNATURE_IDS = tuple(dict.fromkeys(i for sig in SIGNATURES for i in sig.ids))


def _site(src: TapSource, step: int, tap: str) -> Site | None:
    """The site of a tap both sides hold in the same shape (a shape mismatch is no numeric bug)."""
    layer, op = parse_tap_name(tap)
    s = Site(src, step, layer, op)
    c, b = s.cand(), s.base()
    return s if c is not None and b is not None and c.shape == b.shape else None


def diagnose(src: TapSource, step: int, tap: str) -> list[Diagnosis]:
    """Named bugs that explain the divergence of `tap` at `step`, best first; [] when none fits."""
    s = _site(src, step, tap)
    if s is None:
        return []
    c, b = s.cand(), s.base()
    has_nonfinite = not bool(torch.isfinite(c[torch.isfinite(b)]).all())
    found = []
    for sig in SIGNATURES:
        if (s.op in sig.ops or "*" in sig.ops) and sig.nonfinite == has_nonfinite:
            d = sig.check(s)
            if d is not None:
                assert d.signature in sig.ids, f"{sig.check.__name__} reported an undeclared id {d.signature!r}"
                found.append(d)
    return found


def explain_rounding(src: TapSource, step: int, tap: str) -> Diagnosis | None:
    """Word an in-noise difference: a known rounding point when one fits, else its size in ulps."""
    s = _site(src, step, tap)
    if s is None or bool(torch.equal(s.cand(), s.base())):
        return None
    if s.op in NORM_OPS and (d := rounding_point(s)) is not None:
        return d
    c, b, g = s.cand(), s.base(), s.src.gold(step, tap)
    n = ulps(c, b, src.dtype)
    ev = {"max_ulps": n}
    msg = f"{tap} differs from the reference by up to {_ulps(n, s.dtype_name)}"
    if g is not None:
        ev |= {"rel_err": rel(c, g), "ref_rel_err": rel(b, g)}
        msg += f" (rel. L2 to fp64 {ev['rel_err']:.2g}, reference {ev['ref_rel_err']:.2g})"
    return Diagnosis("rounding_order", msg + ": another rounding order, not a bug", ev)
