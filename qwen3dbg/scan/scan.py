"""`scan-checkpoint`: is the checkpoint itself sound, and what about it is numerically dangerous?"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qwen3dbg.scan import checks
from qwen3dbg.scan.container import INTEGER_DTYPES, lost_tensors
from qwen3dbg.scan.findings import CheckpointFinding, NormPeak, ScanResult, TensorRow
from qwen3dbg.scan.source import CheckpointSource, open_source

_COUNT_WHY = (
    "the config belongs to another model or the weights are incomplete: loaders fail, or run layers "
    "and experts that are not there"
)


def _config_findings(src: CheckpointSource, hf_of: dict[str, list[str]]) -> list[CheckpointFinding]:
    """Counts first (layers, experts), then each tensor the config implies within what the files hold."""
    from qwen3dbg.model.gguf_names import gguf_shapes, gguf_to_hf
    from qwen3dbg.model.layout import Held, count_problems, tensor_shapes

    cfg = src.cfg
    lost = lost_tensors(src.findings)
    lost_hf = lost if src.format == "safetensors" else {h for n in lost for h in gguf_to_hf(n)}
    held = Held.of([h for names in hf_of.values() for h in names] + sorted(lost_hf))
    out = [
        CheckpointFinding("error", kind, message, _COUNT_WHY, numbers=numbers)
        for kind, message, numbers in count_problems(cfg, held)
    ]
    expected = tensor_shapes(cfg, held=held)
    if src.format == "gguf":
        expected = gguf_shapes(expected)
    shapes = {e.name: e.shape for e in src.entries}
    out += [
        f
        for f in checks.against_config(cfg, shapes, expected, hf_of)
        if not (f.check == "missing" and f.tensor in lost)
    ]
    by_name = {e.name: e for e in src.entries}
    if (
        cfg.tie_word_embeddings
        and src.format == "safetensors"
        and "lm_head.weight" in by_name
        and "model.embed_tokens.weight" in by_name
    ):
        out.append(checks.tied_head(src.same_bytes(by_name["lm_head.weight"], by_name["model.embed_tokens.weight"])))
    return out


def scan_checkpoint(
    path: str | Path,
    thresholds: checks.Thresholds = checks.Thresholds(),
    progress: Callable[[int], Callable[[int], None]] | None = None,
    fail_on: str = "error",
) -> ScanResult:
    """Scan PATH; `progress(total_bytes)` may return a callback that is given each tensor's bytes as it is done;
    the result fails (exit 1) on findings at or above `fail_on`."""
    t0 = time.perf_counter()
    with open_source(path) as src:
        findings = list(src.findings)
        hf_of = {e.name: src.hf_names(e) for e in src.entries}
        if src.cfg is not None:
            findings += _config_findings(src, hf_of)
        findings += checks.dtypes(src.entries, src.cfg, src.format == "gguf")
        tick = progress(sum(e.nbytes for e in src.entries)) if progress else None
        rows, peaks, read = [], [], 0
        for e in src.entries:
            s = src.stats(e)
            rows.append(TensorRow(e.name, e.file.name, e.dtype, e.shape, e.nbytes, s))
            hf = (hf_of[e.name] or [e.name])[0]
            if s is not None:
                read += e.nbytes
                findings += checks.values(e.name, hf, s, src.cfg, thresholds)
                role = checks.norm_role(hf)
                if role is not None:
                    peaks.append(NormPeak(role[0], role[1], e.name, s.absmax))
            elif e.dtype not in INTEGER_DTYPES:  # integers have their own error in checks.dtypes
                findings.append(
                    CheckpointFinding(
                        "info",
                        "dtype",
                        f"{e.name} is {e.dtype}: no value statistics",
                        "only float tensors are summarized",
                        e.name,
                    )
                )
            if tick:
                tick(e.nbytes)
        findings += checks.norm_danger(peaks, thresholds)
        return ScanResult(
            str(path),
            src.format,
            [{"path": str(f), "bytes": f.stat().st_size} for f in src.files],
            src.cfg.to_hf_dict() if src.cfg else None,
            rows,
            peaks,
            findings,
            time.perf_counter() - t0,
            read,
            thresholds.to_dict(),
            fail_on,
        )
