"""What the terminal and HTML views of a ScanResult / WeightsDiffResult show alike: findings grouped by tensor,
the counts, the read, the norm peaks per layer. Nothing is recomputed."""

from __future__ import annotations

from collections import defaultdict

from qwen3dbg.scan.findings import CheckpointFinding, ScanResult, Verdict, rank
from qwen3dbg.util.text import plural

NORM_COLUMNS = ("q_norm", "k_norm", "input_layernorm", "post_attention_layernorm", "norm")  # norm: the final one
#: checks shown first within a severity: a non-finite weight turns every activation it touches into NaN
FIRST_CHECKS = ("nonfinite",)
RATE_MIN_BYTES = 100e6  # below this a read takes milliseconds and its GB/s says nothing


def counts_line(result: Verdict) -> str:
    c = result.counts()
    return f"{plural(c['error'], 'error')}, {plural(c['warning'], 'warning')}, {plural(c['info'], 'note')}"


def _severity_key(findings: list[CheckpointFinding]) -> tuple:
    return min((-rank(f.severity), f.check not in FIRST_CHECKS) for f in findings)


def by_tensor(result: Verdict) -> list[tuple[str | None, list[CheckpointFinding]]]:
    """Findings grouped by tensor (None: the checkpoint as a whole), worst group first, non-finite first
    among equals; within a group, worst finding first. Ties keep the scan's order."""
    groups: dict[str | None, list[CheckpointFinding]] = defaultdict(list)
    for f in result.findings:
        groups[f.tensor].append(f)
    ordered = sorted(groups.items(), key=lambda kv: _severity_key(kv[1]))
    return [(tensor, sorted(fs, key=lambda f: _severity_key([f]))) for tensor, fs in ordered]


def what(f: CheckpointFinding) -> str:
    """The message without the tensor name its group heading already shows."""
    return f.message.removeprefix(f"{f.tensor} ") if f.tensor else f.message


def read_line(result: ScanResult) -> str:
    """What was read and how fast: a rate only where the read is long enough to measure one."""
    gb = result.bytes_read / 1e9
    size = f"{gb:.3g} GB" if gb >= 1 else f"{result.bytes_read / 1e6:.3g} MB"
    rate = f", {gb / result.seconds:.2f} GB/s" if result.bytes_read >= RATE_MIN_BYTES and result.seconds > 0 else ""
    return (
        f"{result.format}, {plural(len(result.files), 'file')}, {plural(len(result.tensors), 'tensor')}, "
        f"{size} read in {result.seconds:.2f} s{rate}"
    )


def peaks_by_layer(result: ScanResult) -> list[tuple[str, dict[str, float]]]:
    rows: dict = defaultdict(dict)
    for p in result.norm_peaks:
        rows[p.layer][p.kind] = p.absmax
    layers = sorted(k for k in rows if k is not None)
    return [(str(k), rows[k]) for k in layers] + ([("final", rows[None])] if None in rows else [])


def num(x) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
