"""The differ's second half: explain the first divergent op by testing hypotheses on the tensors alone.

A hypothesis replays the op from the reference's and the candidate's own tensors and the checkpoint with
one thing changed, and is stated only when it reproduces the candidate's tensor within the noise floor of
the tap (its residual, in units of that floor, is in the evidence). Families run cheapest first and the
first family that explains the tensor ends the search:

1. `structure`: permutations along named axes, an op skipped or applied twice, LayerNorm for RMSNorm, ...
2. `parameters`: scalar parameters fitted (scales, RMSNorm eps, RoPE theta and offset, temperature);
3. `substitution`: another weight or another tap as operand;
4. `recompute`: the op replayed the way other engines compute it, and where NaN/inf are born;
5. `grammar`: kinds nobody listed, as the simplest composition of small edits (index maps, signs and scales on
   any axis, the op twice, skipped or swapped with its neighbour; two edits when one does not fit).

`systematic` looks below the noise, `explain_rounding` words differences inside it: a cause only where a
replay under that rounding order reproduces the candidate, else the measured figures alone. Hypotheses read
only the taps they need, through `Site`, which refuses taps computed after the op (data flow); one the
TapSource does not hold is skipped. `Site.explained` is the gate every replayed hypothesis passes.
"""

from __future__ import annotations

import math

import torch

from qwen3dbg.diff.diagnosis import grammar, parameters, recompute, structure, substitution
from qwen3dbg.diff.diagnosis.hypothesis import NORM_OPS
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site, TapSource, ulps_phrase
from qwen3dbg.diff.diagnosis.recompute import amplification, rounding_point, summation_order
from qwen3dbg.diff.metrics import rel, ulps
from qwen3dbg.tapstore.schema import parse_tap_name

__all__ = ["Diagnosis", "TapSource", "diagnose", "explain_rounding", "amplification", "FAMILIES", "SIGNATURE_IDS"]

#: (family, its hypotheses), cheapest first
FAMILIES = (
    ("structure", structure.HYPOTHESES),
    ("parameters", parameters.HYPOTHESES),
    ("substitution", substitution.HYPOTHESES),
    ("recompute", recompute.HYPOTHESES),
    ("grammar", grammar.HYPOTHESES),
)
#: every id diagnose() can report; explain_rounding reports rounding_point, rounding_order or in_noise
SIGNATURE_IDS = tuple(dict.fromkeys(i for _, hyps in FAMILIES for h in hyps for i in h.ids))


def _site(src: TapSource, step: int, tap: str) -> Site | None:
    """The site of a tap both sides hold in the same shape (a shape mismatch is no numeric bug)."""
    layer, op = parse_tap_name(tap)
    s = Site(src, step, layer, op)
    c, b = s.cand(), s.base()
    return s if c is not None and b is not None and c.shape == b.shape else None


def _rank(d: Diagnosis) -> float:
    return d.evidence.get("residual_in_noise", math.inf)


def diagnose(src: TapSource, step: int, tap: str) -> list[Diagnosis]:
    """Hypotheses that explain the divergence of `tap` at `step` within the noise, best explained first;
    [] when none does."""
    s = _site(src, step, tap)
    if s is None:
        return []
    c, b = s.cand(), s.base()
    has_nonfinite = bool((torch.isfinite(b) & ~torch.isfinite(c)).any())
    if not has_nonfinite and not s.divergent():
        return []
    for _, hyps in FAMILIES:
        found = []
        for h in hyps:
            if (s.op in h.ops or "*" in h.ops) and h.nonfinite == has_nonfinite:
                d = h.check(s)
                if d is not None:
                    assert d.signature in h.ids, f"{h.check.__name__} reported an undeclared id {d.signature!r}"
                    found.append(d)
        if found:
            return sorted(found, key=_rank)
    return []


def explain_rounding(src: TapSource, step: int, tap: str) -> Diagnosis | None:
    """Word an in-noise difference: a rounding point or summation order when its replay reproduces the
    candidate, else only what is measured (its size in ulps and both sides' distance to fp64), no cause."""
    s = _site(src, step, tap)
    if s is None or bool(torch.equal(s.cand(), s.base())):
        return None
    if s.op in NORM_OPS and (d := rounding_point(s)) is not None:
        return d
    if (d := summation_order(s)) is not None:
        return d
    c, b, g = s.cand(), s.base(), s.src.gold(step, tap)
    n = ulps(c, b, src.dtype)
    ev = {"max_ulps": n}
    msg = f"{tap} is within the noise floor and differs from the reference by up to {ulps_phrase(n, s.dtype_name)}"
    if g is not None:
        ev |= {"rel_err": rel(c, g), "ref_rel_err": rel(b, g)}
        msg += f" (rel. L2 to fp64 {ev['rel_err']:.2g}, reference {ev['ref_rel_err']:.2g})"
    return Diagnosis("in_noise", msg + "; no replay reproduced the difference, so no cause is stated", ev)
