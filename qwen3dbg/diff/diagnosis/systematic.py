"""Below the noise: signed deviations of the candidate that every element shares, which rounding cannot
make. An eps of 1e-5 for 1e-6 in bf16 shrinks every normalised value the same way, while rounding errors
scatter both ways.

The data is c - r, the candidate's signed deviation from fp64 minus the reference's own, summed per row
of each tap by the comparison kernel, alone and weighted by the golden: a shift and a scale. Rows are the
units (a row shares a norm's scale or a softmax's sum): the statistic is the self-normalised sum over rows,
z = sum S_i / sqrt(sum S_i^2), standard normal when rows are independent. They are not quite: attention
carries one token's rounding into the next ones. The reference's own signed deviation from fp64, r - g,
went through the same layers, so its z over every tap tested measures that inflation, and so do the
candidate's z over every tap, most of which a bug leaves alone (genomic control: lambda = median z^2 /
median chi2_1, the larger of the two, never under 1); each z is divided by sqrt(lambda). The
threshold is two-sided at a family-wise false-alarm rate FALSE_ALARM over every tap and both statistics
(Bonferroni), with a MARGIN for the correlation that genomic control leaves. |z| <= sqrt(rows), so only
taps of MIN_ROWS rows or more are tested (a decode step's hidden state, one row, never is).

Genomic control cannot see an effect that moves every tap (an eps in every RMSNorm): it takes it for
correlation. Where the op's own deviation can be seen alone it needs no correction: a tap whose inputs are
bit-identical on both sides (the first op where the candidate departs, and the ops beside it) inherits
nothing, so its rows' deviations are independent, and under "another rounding order" each row's sum is
as likely to be positive as negative. There an exact sign test over the rows that differ, with Bonferroni
over those taps, is the test (no model of the magnitudes). The two families share FALSE_ALARM, half each.
Rows must be independent: rows with bit-identical sums (a repeated token, a head whose attention is
uniform like the others') are counted once. And both sides must hand the tap in one dtype: a side that
keeps it wider (a port's float32 probabilities) makes c - r the reference's own rounding of the same
values, whose sign is a fixed function of each value (1/(t+1) at every head of position t), not a coin.
"""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist

import numpy as np
import torch

from qwen3dbg.diff.result import Divergence, Finding, TapResult
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import inputs_of
from qwen3dbg.util.dtypes import dtype_name

#: the per-run false-alarm rate the threshold is set for, over every tap and statistic tested
FALSE_ALARM = 1e-3
#: fewer rows cannot pass the threshold (|z| <= sqrt(rows)), and would bias the inflation towards 1/0.455
MIN_ROWS = 32
#: the threshold's margin over Bonferroni for the row correlation genomic control leaves: HF's sdpa path
#: reaches z = 4.7 after the correction on attn_out against eager in fp16 (Bonferroni: 4.5 for 69 taps)
MARGIN = 1.3
_MEDIAN_CHI2_1 = NormalDist().inv_cdf(0.75) ** 2  # 0.455


def signed_stats(rows, count: int, gold_norm: float, dtype: torch.dtype, same_rounding: bool = True) -> dict:
    """A tap's signed statistics from its per-row sums [4, rows] (c - r, (c - r) g, r - g, (r - g) g) over
    `count` judged elements: z of each, the candidate's fitted shift (in ulps at the golden's RMS) and
    scale with their standard errors, and, when both sides round the tap to one dtype (`same_rounding`),
    how many rows move each way (the sign test's data). In numpy: every tap of a run pays for it."""
    if count == 0 or gold_norm == 0:
        return {}
    a = np.asarray(rows, dtype=np.float64)
    unit = torch.finfo(dtype).eps * gold_norm / math.sqrt(count)  # an ulp at the tap's RMS magnitude
    out = {"rows": a.shape[1]}
    totals, spreads = a.sum(1).tolist(), np.sqrt(np.einsum("ij,ij->i", a, a)).tolist()
    signs = _distinct_signs(a) if same_rounding else None
    for i, (kind, per) in enumerate(
        (("shift", count * unit), ("scale", gold_norm**2), ("ref_shift", 1.0), ("ref_scale", 1.0))
    ):
        total, spread = totals[i], spreads[i]
        out[f"z_{kind}"] = total / spread if spread > 0 else 0.0
        if i < 2:
            out |= {kind: total / per, f"se_{kind}": spread / per}
            if signs is not None:
                out[f"signs_{kind}"] = signs[i]
    return out


def _distinct_signs(a: np.ndarray) -> list[list[int]]:
    """[negative, positive] counts of the candidate's shift and scale sums (rows 0 and 1 of `a` [4, rows])
    over the distinct rows: a row computed twice from the same values (a repeated token) is one. Rows with
    both sums zero count neither way; the rest are told apart by all four sums: as tuples in a set when few
    (a decode step's), else sorted, and only when two share a shift sum (otherwise no two can be equal)."""
    moving = a[:, (a[0] != 0) | (a[1] != 0)] + 0.0  # + 0.0: -0.0 and 0.0 are one value
    if moving.shape[1] <= _FEW_ROWS:
        rows = set(zip(*moving.tolist()))
        return [[sum(r[i] < 0 for r in rows), sum(r[i] > 0 for r in rows)] for i in (0, 1)]
    shifts = np.sort(moving[0])
    if (shifts[1:] == shifts[:-1]).any():
        moving = np.unique(moving.T, axis=0).T
    return [[int((moving[i] < 0).sum()), int((moving[i] > 0).sum())] for i in (0, 1)]


#: rows deduplicated as tuples in a set: numpy's per-call cost is the whole cost below this
_FEW_ROWS = 64


def sign_test(neg: int, pos: int) -> float:
    """Two-sided exact sign test: the chance that n = neg + pos fair coins split at least this unevenly."""
    n, k = neg + pos, min(neg, pos)
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))


def inflation(zs: list[float]) -> float:
    """Genomic control: how much correlation between rows inflates z^2, from z values under the null."""
    if not zs:
        return 1.0
    return max(1.0, statistics.median(z * z for z in zs) / _MEDIAN_CHI2_1)


def threshold(tests: int) -> float:
    """|z| over which one of `tests` two-sided tests is flagged at family-wise rate FALSE_ALARM / 2 (the
    other half is the sign test's)."""
    return NormalDist().inv_cdf(1 - FALSE_ALARM / (4 * max(tests, 1)))


def scored(taps: list[TapResult], div: Divergence | None, dtype: torch.dtype, cfg: Qwen3Config) -> list[tuple]:
    """Every test of the compared taps before the first divergence, as (score, finding): a score over 1
    passes its family's corrected threshold."""
    before = []
    for t in taps:
        if div is not None and (t.step, t.name) == (div.step, div.tap):
            break
        before.append(t)
    by_key = {(t.step, t.name): t for t in before}
    own = [t for t in before if t.status == "ok" and t.extra.get("signed") and _inputs_identical(t, by_key, cfg)]
    tested = [t for t in before if t.status == "ok" and t.extra.get("signed", {}).get("rows", 0) >= MIN_ROWS]
    return _sign_tests(own, dtype) + _genomic(tested, dtype)


def detect(taps: list[TapResult], div: Divergence | None, dtype: torch.dtype, cfg: Qwen3Config) -> Finding | None:
    """The most significant systematic deviation among the compared taps before the first divergence, as
    a finding (exit status unchanged), or None when none passes its corrected threshold."""
    best = max(scored(taps, div, dtype, cfg), key=lambda f: f[0], default=None)
    return best[1] if best is not None and best[0] > 1 else None


def _inputs_identical(t: TapResult, by_key: dict, cfg: Qwen3Config) -> bool:
    """Every tap the op reads was compared and is bit-identical on both sides: the tap's deviation is its own."""
    ins = [by_key.get((t.step, n)) for n in inputs_of(t.name, cfg)]
    return all(i is not None and i.status == "ok" and i.diff_ulps == 0 for i in ins)


def _what(kind: str, st: dict, dtype: torch.dtype) -> str:
    if kind == "shift":
        return f"shifted by {st['shift']:+.2g} {dtype_name(dtype)} ulp (at its RMS magnitude) against the reference"
    return f"the reference scaled by 1 {st['scale']:+.2g}"


#: measured figures only: no replay has shown what moves the tap (an eps, a scale, a rounding mode)
_NO_CAUSE = "no replay has shown the cause"


def _sign_tests(own: list[TapResult], dtype: torch.dtype) -> list[tuple]:
    tests = [(t, k) for t in own for k in ("shift", "scale") if sum(t.extra["signed"].get(f"signs_{k}", ()))]
    alpha = FALSE_ALARM / 2 / max(len(tests), 1)
    out = []
    for t, kind in tests:
        st = t.extra["signed"]
        neg, pos = st[f"signs_{kind}"]
        p = sign_test(neg, pos)
        score = math.log(max(p, 1e-300)) / math.log(alpha)
        ev = {
            "kind": kind,
            "test": "sign",
            "rows_down": neg,
            "rows_up": pos,
            "p": p,
            "threshold": alpha,
            "taps_tested": len(tests),
            f"fitted_{kind}": st[kind],
        }
        message = (
            f"{t.name} is {_what(kind, st, dtype)}, within the noise floor but systematic: its inputs are "
            f"bit-identical to the reference's, and {max(neg, pos)} of the {neg + pos} rows that differ move "
            f"the same way (sign test p = {p:.2g}; threshold {alpha:.2g} for {len(tests)} tests): rounding "
            f"would move rows either way; {_NO_CAUSE}"
        )
        out.append((score, Finding(t.step, t.name, t.diff_ulps, 0.0, message, f"systematic_{kind}", ev)))
    return out


def _genomic(tested: list[TapResult], dtype: torch.dtype) -> list[tuple]:
    crit = MARGIN * threshold(2 * len(tested))
    lam = {
        kind: max(inflation([t.extra["signed"][f"z_{side}{kind}"] for t in tested]) for side in ("", "ref_"))
        for kind in ("shift", "scale")
    }
    out = []
    for t in tested:
        st = t.extra["signed"]
        for kind in ("shift", "scale"):
            z = st[f"z_{kind}"] / math.sqrt(lam[kind])
            limit = crit * math.sqrt(lam[kind]) * st[f"se_{kind}"]
            ev = {
                "kind": kind,
                "test": "genomic control",
                "z": z,
                "threshold": crit,
                "inflation": lam[kind],
                "taps_tested": len(tested),
                "rows": st["rows"],
                f"fitted_{kind}": st[kind],
                "detection_limit": limit,
            }
            message = (
                f"{t.name} is {_what(kind, st, dtype)}, within the noise floor but systematic: z = {z:.3g} over "
                f"{st['rows']} rows (threshold {crit:.2g} for {len(tested)} taps, row correlation {lam[kind]:.2g}; "
                f"detection limit {limit:.2g}): rounding would scatter both ways, as the reference's deviation "
                f"does; {_NO_CAUSE}"
            )
            out.append((abs(z) / crit, Finding(t.step, t.name, t.diff_ulps, 0.0, message, f"systematic_{kind}", ev)))
    return out
