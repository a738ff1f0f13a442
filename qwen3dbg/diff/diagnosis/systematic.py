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
"""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist

import torch

from qwen3dbg.diff.result import Divergence, Finding, TapResult
from qwen3dbg.util.dtypes import dtype_name

#: the per-run false-alarm rate the threshold is set for, over every tap and statistic tested
FALSE_ALARM = 1e-3
#: fewer rows cannot pass the threshold (|z| <= sqrt(rows)), and would bias the inflation towards 1/0.455
MIN_ROWS = 32
#: the threshold's margin over Bonferroni for the row correlation genomic control leaves: HF's sdpa path
#: reaches z = 4.7 after the correction on attn_out against eager in fp16 (Bonferroni: 4.5 for 69 taps)
MARGIN = 1.3
_MEDIAN_CHI2_1 = NormalDist().inv_cdf(0.75) ** 2  # 0.455


def signed_stats(rows: torch.Tensor, count: int, gold_norm: float, dtype: torch.dtype) -> dict:
    """A tap's signed statistics from its per-row sums [4, rows] (c - r, (c - r) g, r - g, (r - g) g) over
    `count` judged elements: z of each, the candidate's fitted shift (in ulps at the golden's RMS) and
    scale, and their standard errors."""
    if count == 0 or gold_norm == 0:
        return {}
    unit = torch.finfo(dtype).eps * gold_norm / math.sqrt(count)  # an ulp at the tap's RMS magnitude
    out = {"rows": rows.shape[1]}
    totals, spreads = rows.sum(1).tolist(), rows.square().sum(1).sqrt().tolist()
    for i, (kind, per) in enumerate(
        (("shift", count * unit), ("scale", gold_norm**2), ("ref_shift", 1.0), ("ref_scale", 1.0))
    ):
        total, spread = totals[i], spreads[i]
        out[f"z_{kind}"] = total / spread if spread > 0 else 0.0
        if i < 2:
            out |= {kind: total / per, f"se_{kind}": spread / per}
    return out


def inflation(zs: list[float]) -> float:
    """Genomic control: how much correlation between rows inflates z^2, from z values under the null."""
    if not zs:
        return 1.0
    return max(1.0, statistics.median(z * z for z in zs) / _MEDIAN_CHI2_1)


def threshold(tests: int) -> float:
    """|z| over which one of `tests` two-sided tests is flagged at family-wise rate FALSE_ALARM."""
    return NormalDist().inv_cdf(1 - FALSE_ALARM / (2 * max(tests, 1)))


def detect(taps: list[TapResult], div: Divergence | None, dtype: torch.dtype) -> Finding | None:
    """The most significant systematic deviation among the compared taps before the first divergence, as
    a finding (exit status unchanged), or None when none passes the corrected threshold."""
    tested = []
    for t in taps:
        if div is not None and (t.step, t.name) == (div.step, div.tap):
            break
        if t.status == "ok" and t.extra.get("signed", {}).get("rows", 0) >= MIN_ROWS:
            tested.append(t)
    crit = MARGIN * threshold(2 * len(tested))
    lam = {
        kind: max(inflation([t.extra["signed"][f"z_{side}{kind}"] for t in tested]) for side in ("", "ref_"))
        for kind in ("shift", "scale")
    }
    found = [
        (abs(t.extra["signed"][f"z_{kind}"]) / math.sqrt(lam[kind]) / crit, kind, t)
        for t in tested
        for kind in ("shift", "scale")
    ]
    if not found or max(found, key=lambda f: f[0])[0] <= 1:
        return None
    _, kind, t = max(found, key=lambda f: f[0])
    st = t.extra["signed"]
    z = st[f"z_{kind}"] / math.sqrt(lam[kind])
    limit = crit * math.sqrt(lam[kind]) * st[f"se_{kind}"]
    ev = {
        "kind": kind,
        "z": z,
        "threshold": crit,
        "inflation": lam[kind],
        "taps_tested": len(tested),
        "rows": st["rows"],
        f"fitted_{kind}": st[kind],
        "detection_limit": limit,
    }
    if kind == "shift":
        what = f"shifted by {st['shift']:+.2g} {dtype_name(dtype)} ulp (at its RMS magnitude) against the reference"
    else:
        what = f"the reference scaled by 1 {st['scale']:+.2g}"
    # Measured figures only: no replay has shown what moves the tap (an eps, a scale, a rounding mode).
    why = "rounding would scatter both ways, as the reference's deviation does; no replay has shown the cause"
    return Finding(
        t.step,
        t.name,
        t.diff_ulps,
        0.0,
        f"{t.name} is {what}, within the noise floor but systematic: z = {z:.3g} over {st['rows']} rows "
        f"(threshold {crit:.2g} for {len(tested)} taps, row correlation {lam[kind]:.2g}; detection limit "
        f"{limit:.2g}): {why}",
        f"systematic_{kind}",
        ev,
    )
