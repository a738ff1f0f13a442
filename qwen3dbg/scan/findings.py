"""The result objects of `scan-checkpoint` and `diff-weights`: findings, per-tensor rows, verdicts.

Renderers (`qwen3dbg.reports.scan_terminal`, `scan_html`, `scan_json`) only read these.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from qwen3dbg.scan.stats import Stats

SEVERITIES = ("info", "warning", "error")


def rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class CheckpointFinding:
    severity: str  # info | warning | error
    check: str  # short id of the rule, e.g. "nonfinite", "ghost-bias", "norm-danger"
    message: str  # what was found, with its numbers
    why: str  # one line on why it matters
    tensor: str | None = None
    numbers: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.severity in SEVERITIES, self.severity

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "check": self.check,
            "tensor": self.tensor,
            "message": self.message,
            "why": self.why,
            "numbers": self.numbers,
        }


@dataclass(frozen=True)
class TensorRow:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    stats: Stats | None  # None: not read (damaged, or not a float type)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "stats": self.stats.to_dict() if self.stats else None,
        }


@dataclass(frozen=True)
class NormPeak:
    """The largest |weight| of one norm: what a rounding error entering that norm is multiplied by."""

    layer: int | None  # None: the final norm
    kind: str  # q_norm, k_norm, input_layernorm, post_attention_layernorm, norm
    tensor: str
    absmax: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "tensor": self.tensor, "absmax": self.absmax}


class Verdict:
    """What both results share: findings, their counts, the worst severity and the exit status."""

    findings: list[CheckpointFinding]
    fail_on: str  # the least severity that fails the command: warning | error

    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {s: c.get(s, 0) for s in SEVERITIES}

    def worst(self) -> str | None:
        return max((f.severity for f in self.findings), key=rank, default=None)

    @property
    def exit_code(self) -> int:
        """0 clean, 1 when a finding is at or above `fail_on`."""
        worst = self.worst()
        return int(worst is not None and rank(worst) >= rank(self.fail_on))

    def sorted_findings(self) -> list[CheckpointFinding]:
        return sorted(self.findings, key=lambda f: -rank(f.severity))


@dataclass
class ScanResult(Verdict):
    path: str
    format: str  # safetensors | gguf
    files: list[dict]  # {"path", "bytes"}
    config: dict | None  # the config checked against (HF field names), None when there was none
    tensors: list[TensorRow]
    norm_peaks: list[NormPeak]
    findings: list[CheckpointFinding]
    seconds: float
    bytes_read: int
    thresholds: dict
    fail_on: str = "error"

    def to_dict(self) -> dict:
        return {
            "kind": "scan-checkpoint",
            "path": self.path,
            "format": self.format,
            "files": self.files,
            "config": self.config,
            "thresholds": self.thresholds,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "counts": self.counts(),
            "findings": [f.to_dict() for f in self.sorted_findings()],
            "norm_peaks": [p.to_dict() for p in self.norm_peaks],
            "tensors": [t.to_dict() for t in self.tensors],
        }


@dataclass(frozen=True)
class TensorDiff:
    """One HF tensor present in both checkpoints."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    relation: str  # equal | rounding | changed | permuted | transposed | reshaped
    max_abs_diff: float | None
    rel_to_absmax: float | None  # max |a - b| / max |a|
    tolerance: float | None  # the rel_to_absmax the coarser format's rounding allows

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "relation": self.relation,
            "max_abs_diff": self.max_abs_diff,
            "rel_to_absmax": self.rel_to_absmax,
            "tolerance": self.tolerance,
        }


@dataclass
class WeightsDiffResult(Verdict):
    a: str
    b: str
    only_a: list[str]
    only_b: list[str]
    tensors: list[TensorDiff]
    findings: list[CheckpointFinding]
    seconds: float
    fail_on: str = "error"

    def to_dict(self) -> dict:
        return {
            "kind": "diff-weights",
            "a": self.a,
            "b": self.b,
            "seconds": self.seconds,
            "counts": self.counts(),
            "only_a": self.only_a,
            "only_b": self.only_b,
            "findings": [f.to_dict() for f in self.sorted_findings()],
            "tensors": [t.to_dict() for t in self.tensors],
        }
