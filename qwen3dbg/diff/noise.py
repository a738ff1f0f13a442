"""The divergence rule: a candidate's error against the fp64 golden, judged by the reference's own error.

docs/differ.md states the rule for users; the constants live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

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
