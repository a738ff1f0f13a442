"""`diff-weights A B`: two checkpoints tensor by tensor, in HF names (GGUF names are mapped back).

Each tensor present in both is equal, within the rounding its two formats allow, permuted the way
llama.cpp's converter reorders q/k for Llama-style rope, transposed, reshaped, or changed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.scan.container import FLOAT_NAMES, Entry
from qwen3dbg.scan.findings import CheckpointFinding, TensorDiff, WeightsDiffResult
from qwen3dbg.scan.source import CheckpointSource, open_source

# Largest error of storing a value in a format, relative to the tensor's absmax: half an ulp for floats,
# for block formats half a step of the block scale (amax/127 for Q8_0) plus the f16 rounding of that scale.
_REL = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
    "Q8_0": 1 / 254 + 2.0**-11,
    "Q5_0": 1 / 30 + 2.0**-11,
    "Q4_0": 1 / 14 + 2.0**-11,
}  # keys: scan names (FLOAT_NAMES)
_F16_SUBNORMAL = 2.0**-25  # absolute: half the spacing of f16's subnormals
_EXACT_IN = {"bfloat16": {"float32", "float64"}, "float16": {"float32", "float64"}, "float32": {"float64"}}


def rounding_tolerance(dtype_a: str, dtype_b: str) -> tuple[float, float]:
    """(relative to absmax, absolute) bound on |a - b| when both hold the same weights in these formats.

    Zero when one format holds the other's values exactly; otherwise the two storage errors add (both
    may have been rounded from a finer original). Unknown block formats get a loose 1/8."""
    a, b = FLOAT_NAMES.get(dtype_a, dtype_a), FLOAT_NAMES.get(dtype_b, dtype_b)
    if a == b and a in _EXACT_IN or b in _EXACT_IN.get(a, ()) or a in _EXACT_IN.get(b, ()):
        return 0.0, 0.0
    rel = _REL.get(a, 0.125) + _REL.get(b, 0.125)
    return rel, _F16_SUBNORMAL if "float16" in (a, b) else 0.0


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k reorder for Llama-style rope, w [n_heads*D, ...] -> same shape.

    Within each head, rows [x_0..x_{D/2-1}, y_0..y_{D/2-1}] (HF's rotate-half layout) become
    [x_0, y_0, x_1, y_1, ...] (interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `rope_permute`, w [n_heads*D, ...]."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_heads(name: str, cfg: Qwen3Config | None) -> int | None:
    """Heads a q/k tensor is permuted over (1 for q_norm/k_norm [head_dim]); None for other tensors."""
    if cfg is None:
        return None
    for suffix, heads in (
        ("q_proj.weight", cfg.num_attention_heads),
        ("k_proj.weight", cfg.num_key_value_heads),
        ("q_norm.weight", 1),
        ("k_norm.weight", 1),
    ):
        if name.endswith("self_attn." + suffix):
            return heads
    return None


class _Tensors:
    """HF name -> float32 array of one checkpoint; stacked GGUF experts are read once and sliced."""

    def __init__(self, src: CheckpointSource):
        self.src = src
        self.where: dict[str, tuple[Entry, int | None]] = {}
        for e in src.entries:
            names = src.hf_names(e)
            for i, n in enumerate(names):
                self.where[n] = (e, i if len(names) > 1 else None)
        self._cache: dict[str, np.ndarray] = {}

    def dtype(self, name: str) -> str:
        return self.where[name][0].dtype

    def get(self, name: str) -> np.ndarray:
        e, i = self.where[name]
        if e.name not in self._cache:
            if len(self._cache) >= 4:  # a layer's three stacked expert tensors, read in turn
                self._cache.pop(next(iter(self._cache)))
            self._cache[e.name] = self.src.array(e)
        return self._cache[e.name] if i is None else self._cache[e.name][i]


def _within(a: np.ndarray, b: np.ndarray, rel: float, abs_: float, absmax: float) -> bool:
    return float(np.max(np.abs(a - b), initial=0.0)) <= rel * absmax + abs_


def compare(name: str, a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, heads: int | None) -> TensorDiff:
    """How b relates to a (both float32 arrays holding the same HF tensor)."""
    rel, abs_ = rounding_tolerance(dtype_a, dtype_b)
    absmax = float(np.max(np.abs(a), initial=0.0))

    def diff(relation, max_abs=None):
        r = None if max_abs is None or absmax == 0 else max_abs / absmax
        return TensorDiff(name, a.shape, b.shape, dtype_a, dtype_b, relation, max_abs, r, rel)

    if a.shape != b.shape:
        if a.ndim == 2 and b.shape == a.shape[::-1] and _within(a.T, b, rel, abs_, absmax):
            return diff("transposed")
        return diff("reshaped")
    max_abs = float(np.max(np.abs(a - b), initial=0.0))
    if max_abs == 0:
        return diff("equal", 0.0)
    if max_abs <= rel * absmax + abs_:
        return diff("rounding", max_abs)
    if heads and a.shape[0] % (2 * heads) == 0:
        for f in (rope_permute, rope_unpermute):
            if _within(f(a, heads), b, rel, abs_, absmax):
                return diff("permuted", max_abs)
    return diff("changed", max_abs)


_WHY = {
    "changed": "the values differ beyond what the two formats' rounding allows: a conversion or loading bug",
    "permuted": "llama.cpp's converter reorders q/k rows this way for Llama-style rope; Qwen3 in llama.cpp uses "
    "NEOX rope and expects them unpermuted, so attention comes out wrong",
    "transposed": "a loader that expects one layout reads the other as garbage",
    "reshaped": "a loader either fails or reads the values in the wrong layout",
}


def _times_absmax(ratio: float | None) -> str:
    """A difference as a multiple of A's absmax ("0.5x A's absmax"); A all zeros has none to measure by."""
    return "and A's values are all zero" if ratio is None else f"{ratio:.3g}x A's absmax"


def _finding(d: TensorDiff, a: str, b: str) -> CheckpointFinding:
    nums = {k: v for k, v in d.to_dict().items() if k != "name"}
    if d.relation == "changed":
        msg = (
            f"{d.name} changed: max |a-b| is {d.max_abs_diff:.4g}, {_times_absmax(d.rel_to_absmax)}; "
            f"rounding from {d.dtype_a} and {d.dtype_b} allows {d.tolerance:.3g}x"
        )
    elif d.relation == "permuted":
        msg = f"{d.name} is permuted like llama.cpp's Llama-style q/k reorder (values otherwise the same)"
    else:
        msg = f"{d.name} is {d.relation}: {list(d.shape_a)} in {a}, {list(d.shape_b)} in {b}"
    return CheckpointFinding("error", d.relation, msg, _WHY[d.relation], d.name, nums)


def diff_weights(
    path_a: str | Path,
    path_b: str | Path,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    fail_on: str = "error",
) -> WeightsDiffResult:
    """Compare every tensor of A with B; `progress(total)` may return a callback given 1 per tensor; the result
    fails (exit 1) on findings at or above `fail_on`."""
    t0 = time.perf_counter()
    with open_source(path_a) as sa, open_source(path_b) as sb:
        ta, tb = _Tensors(sa), _Tensors(sb)
        cfg = sa.cfg or sb.cfg
        findings = [
            CheckpointFinding(f.severity, f.check, f"{side}: {f.message}", f.why, f.tensor, f.numbers)
            for side, s in (("A", sa), ("B", sb))
            for f in s.findings
            if f.severity == "error"
        ]
        only_a = [n for n in ta.where if n not in tb.where]
        only_b = [n for n in tb.where if n not in ta.where]
        findings += [
            CheckpointFinding(
                "error", "missing", f"{n} is in A but not in B", "a loader of B fails or leaves it uninitialized", n
            )
            for n in only_a
        ]
        findings += [
            CheckpointFinding("warning", "extra", f"{n} is in B but not in A", "B carries a tensor A does not have", n)
            for n in only_b
        ]
        common = [n for n in ta.where if n in tb.where]
        tick = progress(len(common)) if progress else None
        diffs = []
        for n in common:
            d = compare(n, ta.get(n), tb.get(n), ta.dtype(n), tb.dtype(n), rope_heads(n, cfg))
            diffs.append(d)
            if d.relation not in ("equal", "rounding"):
                findings.append(_finding(d, str(path_a), str(path_b)))
            if tick:
                tick(1)
        rounded = [d for d in diffs if d.relation == "rounding"]
        if rounded:
            worst = max(rounded, key=lambda d: d.rel_to_absmax or 0.0)
            findings.append(
                CheckpointFinding(
                    "info",
                    "rounding",
                    f"{len(rounded)} tensors differ within their formats' rounding; "
                    f"the largest, {worst.name}, by {_times_absmax(worst.rel_to_absmax)} "
                    f"(allowed {worst.tolerance:.3g}x)",
                    "expected from a conversion",
                    worst.name,
                )
            )
        return WeightsDiffResult(
            str(path_a), str(path_b), only_a, only_b, diffs, findings, time.perf_counter() - t0, fail_on
        )
