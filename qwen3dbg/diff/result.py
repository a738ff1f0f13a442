"""The one result of `qwen3dbg diff`: plain dataclasses that the terminal, JSON and HTML views render
(its one-screen English summary is diff/summary.py)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from functools import cached_property

from qwen3dbg.diff.noise import REF_SUSPECT_REL_L2, REF_SUSPECT_SKIPS
from qwen3dbg.util.jsonio import json_safe

FORMAT = "qwen3dbg-diff/1"
#: the JSON lists every tap of this many decode steps; later ones are summarised per step (step_summary)
DETAILED_DECODE_STEPS = 16


@dataclass
class TapResult:
    """One tap of one step: the candidate's error to fp64 next to the reference's, and the verdict."""

    step: int
    name: str
    layer: int | None
    op: str
    status: str  # "ok", "divergent" or "not_compared"
    reason: str = ""  # why divergent or not compared; empty when ok
    numel: int = 0
    max_abs: float = 0.0  # candidate vs golden over the compared elements
    rel_l2: float = 0.0
    cosine: float = 1.0
    mismatch: float = 0.0  # share of elements further from fp64 than the reference's worst element
    ref_max_abs: float = 0.0  # reference vs golden
    ref_rel_l2: float = 0.0
    tol_rel: float = 0.0
    tol_abs: float = 0.0
    excess: float = 0.0  # max(rel_l2 / tol_rel, max_abs / tol_abs): > 1 is divergent
    diff_ulps: float = 0.0  # ||cand - ref|| / ||gold|| in ulps of the dtype under test
    nonfinite: dict = field(default_factory=dict)  # ref/cand -> NaN/inf where fp64 is finite; gold -> its own
    worst: dict | None = None  # coordinate of the worst element
    extra: dict = field(default_factory=dict)  # logits agreement, routing ties, excluded tokens

    @property
    def divergent(self) -> bool:
        return self.status == "divergent"


def ref_error(t: TapResult) -> float:
    """The reference's rel. L2 error to fp64 over all of the tap's elements."""
    return t.extra.get("ref_rel_l2_alone", t.ref_rel_l2)


@dataclass
class Divergence:
    """The first divergent tap in forward order, and whether its layer introduced the error."""

    step: int
    layer: int | None
    tap: str
    op: str
    reason: str
    excess: float
    max_abs: float
    rel_l2: float
    worst: dict | None
    origin: dict = field(default_factory=dict)  # {"introduced": bool, "method": ..., "message": ..., numbers}
    #: a tensor-parallel run's tap: its layout, and the rank(s) and slice the divergence is traced to
    ranks: dict = field(default_factory=dict)


@dataclass
class Finding:
    """An in-noise difference worth knowing (exit 0): where the candidate rounds differently."""

    step: int
    tap: str
    diff_ulps: float
    input_ulps: float
    message: str
    signature: str = "rounding_point"
    evidence: dict = field(default_factory=dict)


@dataclass
class SideInfo:
    role: str  # "ref", "cand" or "gold"
    spec: str  # as given: an implementation name (with options) or store:DIR
    implementation: str
    dtype: str
    store: str  # the tap store its taps were read from; "" for a side that ran
    notes: list[str] = field(default_factory=list)  # caveats the implementation wrote into its manifest


@dataclass
class DiffResult:
    model: str
    config: dict
    dtype: str
    sides: list[SideInfo]
    steps: list[dict]  # {"step", "tokens", "token_ids", "positions"}
    taps: list[TapResult]
    first_divergence: Divergence | None
    diagnosis: list  # list[qwen3dbg.diff.diagnosis.Diagnosis], best first
    first_nonfinite: dict | None = None  # {"step", "tap", "count"}: the op that first produced NaN/inf
    golden_nonfinite: dict | None = None  # the same of the fp64 golden: the weights or inputs are not finite
    in_noise: Finding | None = None
    systematic: Finding | None = None  # a deviation below the noise that every element shares (a warning)
    routing_ties: list[dict] = field(default_factory=list)
    rule: dict = field(default_factory=dict)  # the tolerance constants in force
    timings: dict = field(default_factory=dict)
    spilled: int = 0  # bytes of the golden's kept rows that went to a (deleted) file instead of memory
    #: why the run stopped before its last tap (memory about to run out: diff/guard.py); None when it finished
    stopped: str | None = None

    @cached_property
    def step_summary(self) -> list[dict]:
        """Error against step, one row per step: its worst excess and tap, how many taps diverge, the logits'
        top-1 agreement and KL; where a long decode leaves the noise floor and how its error grows after."""
        rows: dict[int, dict] = {}
        for t in self.taps:
            row = rows.setdefault(
                t.step,
                {
                    "step": t.step,
                    "worst_excess": 0.0,
                    "worst_tap": None,
                    "divergent": 0,
                    "compared": 0,
                    "top1_agreement": None,
                    "kl": None,
                },
            )
            if t.status == "not_compared":
                continue
            row["compared"] += 1
            row["divergent"] += t.divergent
            if t.excess > row["worst_excess"] or row["worst_tap"] is None:
                row["worst_excess"], row["worst_tap"] = t.excess, t.name
            if t.op == "logits":
                row["top1_agreement"], row["kl"] = t.extra.get("top1_agreement"), t.extra.get("kl")
        return [rows[s] for s in sorted(rows)]

    @property
    def exit_code(self) -> int:
        """1: a divergence; 2: none found, but no tap was compared at all, or the golden is not finite, so
        the input is bad and some taps could not be judged, or the run stopped before its end; 0: none."""
        if self.first_divergence is not None:
            return 1
        return 2 if self.golden_nonfinite or not self.compared or self.stopped else 0

    @property
    def compared(self) -> int:
        """Taps judged: neither side lacked them."""
        return sum(t.status != "not_compared" for t in self.taps)

    @property
    def verdict(self) -> str:
        d, gold = self.first_divergence, self.golden_nonfinite
        if d is None and not self.compared:
            return (
                "not judged: no tap was compared, every one lacks on some side (see the taps' reasons); "
                "a store must hold the taps it does not declare in missing_taps"
            )
        if d is None and self.stopped:
            n = sum(t.status == "ok" for t in self.taps)
            return f"not finished, no divergence in the {n} taps compared: {self.stopped}"
        if d is None and gold:
            return (
                f"not judged: the fp64 golden itself holds NaN/inf from step {gold['step']}, {gold['tap']} on, "
                "so the weights or the inputs are not finite (qwen3dbg scan-checkpoint names the tensors)"
            )
        if d is None:
            n = sum(t.status == "ok" for t in self.taps)
            return f"no divergence: {n} taps within the {self.dtype} noise floor"
        where = f"layer {d.layer}" if d.layer is not None else "outside the layers"
        return f"divergence at step {d.step}, {where}: {d.tap} ({d.reason})"

    @property
    def suspect_reference(self) -> TapResult | None:
        """The first prefill tap where the reference alone is further from fp64 than a correct implementation
        gets. It depends on the reference and the golden only (never on what the candidate left out), and
        stops at the reference's first changed expert choice: past a routing flip within the noise, a
        correct reference is far from fp64 too."""
        for t in self.taps:
            if t.step != 0 or t.extra.get("ref_experts_changed"):
                return None
            if t.status != "not_compared" and t.op not in REF_SUSPECT_SKIPS and ref_error(t) > REF_SUSPECT_REL_L2:
                return t
        return None

    @property
    def not_compared(self) -> list[TapResult]:
        return [t for t in self.taps if t.status == "not_compared"]

    @property
    def detailed_steps(self) -> set[int]:
        """Steps whose every tap the JSON lists: the prefill, the first divergent step and the one before it,
        and the first 16 decode steps; the rest are summarised in step_summary (a 256-step decode would
        otherwise list 200,000 taps)."""
        keep = {0, *range(1, 1 + DETAILED_DECODE_STEPS)}
        d = self.first_divergence
        if d is not None:
            keep |= {d.step, max(d.step - 1, 0)}
        return keep

    def reference_check(self) -> str:
        """The command that confirms a suspect reference: the reference as the candidate of the readable one,
        on the same model, dtype and prompt; scratch itself can only be wrong through the model."""
        ref, model = self.side("ref").spec, shlex.quote(self.model)
        if ref.split(":")[0] == "scratch":
            return f"scratch is the golden's own code, so check the model: qwen3dbg scan-checkpoint {model}"
        ids = "" if ref.startswith("store:") else f" --token-ids {','.join(map(str, self.steps[0]['token_ids']))}"
        return (
            f"check it: qwen3dbg diff --ref scratch --cand {shlex.quote(ref)} --model {model} --dtype {self.dtype}{ids}"
        )

    def side(self, role: str) -> SideInfo:
        return next(s for s in self.sides if s.role == role)

    def to_dict(self) -> dict:
        """Everything, JSON-safe (NaN and inf become null); CI jobs read first_divergence and diagnosis."""
        ref = self.suspect_reference
        d = {
            "format": FORMAT,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "first_divergence": asdict(self.first_divergence) if self.first_divergence else None,
            "diagnosis": [
                {"signature": x.signature, "message": x.message, "evidence": x.evidence} for x in self.diagnosis
            ],
            "first_nonfinite": self.first_nonfinite,
            "golden_nonfinite": self.golden_nonfinite,
            "suspect_reference": {
                "step": ref.step,
                "tap": ref.name,
                "ref_rel_l2": ref_error(ref),
                "check": self.reference_check(),
            }
            if ref
            else None,
            "in_noise": asdict(self.in_noise) if self.in_noise else None,
            "systematic": asdict(self.systematic) if self.systematic else None,
            "routing_ties": self.routing_ties,
            "model": self.model,
            "dtype": self.dtype,
            "sides": [asdict(s) for s in self.sides],
            "rule": self.rule,
            "config": self.config,
            "steps": self.steps,
            "timings": self.timings,
            "spilled": self.spilled,
            "stopped": self.stopped,
            "step_summary": self.step_summary,
            "taps": [asdict(t) for t in self.taps if t.step in self.detailed_steps],
        }
        return json_safe(d)
