"""The divergence rule: a candidate's error against the fp64 golden, judged by the reference's own error.

docs/differ.md states the rule for users; the constants live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

#: a candidate may be this many times further from fp64 than the reference, norm-wise (rel. L2) ...
NORM_FACTOR = 3.0
#: ... and element-wise (max |err|), where a few elements of noise weigh more than in a norm
ELEMENT_FACTOR = 8.0
#: floors that hold where the reference is exact (a gather, a copy): never zero. One rounding gives at
#: most half an ulp per element, about 0.3 ulp in rms, so an rms error of one ulp of the tap's scale ...
REL_FLOOR_ULPS = 1.0
#: ... or a max error of four ulps at the tap's largest magnitude is more than rounding can explain
ABS_FLOOR_ULPS = 4.0
#: a reference this far from fp64 (rel. L2) on a tap of the prefill is itself suspect: every tolerance
#: scales with its error, so a broken one hides a candidate's bugs. Correct bf16 references stay below
#: 0.12 there (the hot-qk test model, q_norm 40 and k_norm 96.5; 0.045 on the 0.6B shape), a RoPE theta
#: of 1e4 puts q_rope at 0.5. Decode steps (one token) and the attention scores and probabilities
#: (a sharp softmax) are left out: a correct reference reaches 0.55 and 0.86 there on hot-qk.
REF_SUSPECT_REL_L2 = 0.25
REF_SUSPECT_SKIPS = ("attn_scores", "attn_probs")
#: the reference's error over n elements is a poor estimate of the noise when n is small (a decode
#: step's attention row, a token's top-k weights): the norm-wise tolerance widens by sqrt(1 + N0/n)
SMALL_SAMPLE_N0 = 64


@dataclass(frozen=True)
class Tolerance:
    """Thresholds of one tap: divergent when rel_l2 > rel or max_abs > abs_."""

    rel: float
    abs_: float

    def excess(self, rel_l2: float, max_abs: float) -> float:
        """How far past the tolerance a candidate is (> 1: divergent)."""
        return max(rel_l2 / self.rel, max_abs / self.abs_)


def tolerance(dtype: torch.dtype, ref_rel_l2: float, ref_max_abs: float, gold_max_abs: float, count: int) -> Tolerance:
    """The tolerance of a tap from the reference's error to fp64 in `dtype` (rel. L2 and max |err|) over
    `count` compared elements and the golden's largest magnitude: a factor over the reference's error,
    widened for small samples, never below the floors."""
    eps = torch.finfo(dtype).eps
    floor_abs = ABS_FLOOR_ULPS * eps * max(gold_max_abs, torch.finfo(dtype).tiny)
    small = (1 + SMALL_SAMPLE_N0 / max(count, 1)) ** 0.5
    return Tolerance(
        rel=max(NORM_FACTOR * small * ref_rel_l2, REL_FLOOR_ULPS * eps),
        abs_=max(ELEMENT_FACTOR * ref_max_abs, floor_abs),
    )


#: The row rule: besides the whole tensor, each row of a tap (a token's vector, a head's query row: the
#: last axis) is judged on its own, so that an error confined to some rows stands out at its own size.
#: Its false-alarm rate per row: 1e-9 keeps a run of 1e6 rows under 1e-3 (Bonferroni) ...
ROW_FALSE_ALARM = 1e-9
#: ... rows with fewer judged elements than this are left to the whole-tensor rule (a decode step's
#: attention row over a few keys: its chi-square tail is too wide to say anything the tap rule does not)
ROW_MIN_ELEMENTS = 16


_ROW_Z = NormalDist().inv_cdf(1 - ROW_FALSE_ALARM)


def row_excess(sums, ref_rel_l2: float, dtype: torch.dtype) -> np.ndarray:
    """Per row, how far past its own tolerance the candidate is (> 1: the row leaves the noise; NaN: not
    judged), from the kernel's row sums [5, rows] of (c - g)^2, (r - g)^2, g^2, the count judged and g^4.

    A row's noise is the reference's error there, never under the tap's noise spread over the row (by its
    share of elements and by its share of the golden's energy): the reference's error over a few elements
    is a poor estimate. Its tolerance is NORM_FACTOR times that noise, never under REL_FLOOR_ULPS of the
    row's golden (the tap rule's, row by row), widened for the spread of a row's error: a candidate at the
    tolerance with Gaussian errors has a row's squared error of tolerance^2 chi2_m / m, and the limit is that
    chi-square's 1 - ROW_FALSE_ALARM quantile (Wilson-Hilferty). Rounding errs in proportion to each value,
    so a row whose energy sits in a few values (an RMSNorm weight of 96.5 on one channel) has fewer degrees
    of freedom than elements: m = (sum g^2)^2 / sum g^4, at most the count.

    In numpy: it runs once per tap, most of them a decode step's few rows, where torch's per-op cost is
    the whole cost."""
    ssc, ssr, ssg, n, g4 = np.asarray(sums, dtype=np.float64)
    total_n, total_ssr = float(n.sum()), float(ssr.sum())
    noise = np.maximum(np.maximum(ssr, ref_rel_l2**2 * ssg), n * (total_ssr / max(total_n, 1.0)))
    tol = np.maximum(NORM_FACTOR**2 * noise, (REL_FLOOR_ULPS * torch.finfo(dtype).eps) ** 2 * ssg)
    m = np.maximum(np.minimum(n, np.square(ssg) / np.maximum(g4, np.finfo(np.float64).tiny)), 1.0)
    k = 2 / (9 * m)
    quantile = (1 - k + _ROW_Z * np.sqrt(k)) ** 3  # chi2_m / m at 1 - ROW_FALSE_ALARM
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.sqrt(ssc / (quantile * tol))
    return np.where((n >= ROW_MIN_ELEMENTS) & (tol > 0), excess, np.nan)
