"""Everything one tap's comparison needs, in one fused pass of a C kernel (fused.c) over the three tensors as
stored; and the logits' argmax and KL per token (`logits_rows`), which `logits_counts` folds per side."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3dbg.diff.metrics import ErrorStats, ratio
from qwen3dbg.util.cbuild import REDUCTION_FLAGS, build

_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
#: per-row sums of `tap_errors(row=...)`, as fused.c's ROW_SUMS
ROW_SUMS = 9


class _Args(ctypes.Structure):
    _fields_ = [
        ("p", ctypes.c_void_p * 3),
        ("dtype", ctypes.c_int * 3),
        ("masked_at", ctypes.c_double * 3),
        ("scores", ctypes.c_int),
        ("keep", ctypes.c_void_p),
        ("limit", ctypes.c_double),
        ("row", ctypes.c_int64),
        ("rows", ctypes.c_void_p * ROW_SUMS),
    ]


class _Out(ctypes.Structure):
    _fields_ = (
        [
            (n, ctypes.c_int64)
            for n in (
                "count",
                "nonfinite_ref",
                "nonfinite_cand",
                "nonfinite_gold",
                "mask_diff",
                "over",
                "argmax",
                "argmin",
            )
        ]
        + [
            (n, ctypes.c_double)
            for n in (
                "ss_cand",
                "ss_ref",
                "ss_gold",
                "ss_diff",
                "dot",
                "max_cand",
                "min_cand",
                "absmax_ref",
                "absmax_gold",
            )
        ]
        + [("head", ctypes.c_double * ROW_SUMS)]
    )


_lib = None
_held = None  # the same library loaded through ctypes.PyDLL: its calls keep the GIL
#: elements under which the kernel is called holding the GIL: a decode step's hundreds of small taps each cost
#: less than the GIL's release and re-acquisition, which waits for the sides' threads when they want it
HOLD_GIL_BELOW = 1 << 16
#: a masked attention score in each element type: at or below half its most negative value
_MASKED_AT = {dt: torch.finfo(dt).min / 2 for dt in _CODES}


# A dozen float64 torch passes per tap (casts, differences, norms, max/min/argmax, dot, masks) cost 12-15x reading
# the stores; this kernel (built on first use like the scan's) reads the fp64 golden, the reference and the
# candidate in their own element types (f64/f32/bf16/f16), widens a block of each to double in cache, and
# accumulates both sides' errors in the same loop. Sums are taken in fixed chunks folded in order, so results do
# not depend on the thread count.
def _kernel():
    global _lib, _held
    if _lib is None:
        lib = build(
            "diff_compare", Path(__file__).with_name("fused.c"), REDUCTION_FLAGS, "the differ's comparison kernel"
        )
        lib.compare.argtypes = [ctypes.POINTER(_Args), ctypes.c_int64, ctypes.POINTER(_Out)]
        lib.compare.restype = ctypes.c_int
        lib.logits_rows.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.logits_rows.restype = None
        _held = ctypes.PyDLL(lib._name)
        _held.compare.argtypes, _held.compare.restype = lib.compare.argtypes, lib.compare.restype
        _lib = lib
    return _lib


def _compare(n: int):
    """The kernel's `compare`, called holding the GIL below HOLD_GIL_BELOW elements."""
    lib = _kernel()
    return (_held if n < HOLD_GIL_BELOW else lib).compare


@dataclass(frozen=True)
class TapErrors:
    """Both sides' errors against the golden over the judged elements: golden finite, not masked (attention
    scores), kept, and both sides finite."""

    count: int  # judged elements
    nonfinite: dict  # {"ref", "cand"}: NaN/inf where the golden is finite and nothing masks or drops it;
    #                  "gold": the golden's own NaN/inf where nothing masks or drops it
    mask_diff: int  # entries the candidate masks and the golden does not, or the reverse (scores only)
    cand: ErrorStats
    ref: ErrorStats  # argmax not located (0)
    gold_norm: float
    gold_max: float  # max |gold| over the judged elements (0 when none)
    dot: float  # err_cand . gold
    diff_norm: float  # ||err_cand - err_ref||
    #: with `row`: per row of the tap, over judged elements, the sums of cand - ref, (cand - ref) * gold,
    #: ref - gold and (ref - gold) * gold (the systematic-deviation test's data), then (cand - gold)^2,
    #: (ref - gold)^2, gold^2, the count of judged elements and gold^4 (the row rule's), float64
    #: [ROW_SUMS, numel / row], in numpy (their readers are, for the same reason as HOLD_GIL_BELOW)
    rows: np.ndarray | None = None


def tap_errors(
    gold: torch.Tensor,
    ref: torch.Tensor,
    cand: torch.Tensor,
    scores: bool = False,
    keep: torch.Tensor | None = None,
    row: int = 0,
) -> TapErrors:
    """gold, ref, cand [...] of one shape, any float dtype; `scores`: masked attention entries (at or below
    finfo.min / 2, or -inf) are left out; keep: bool [...] or None; row: a length dividing numel, for `rows`."""
    if gold.numel() == 0:
        zero = ErrorStats(0.0, 0.0, 0, 0.0)
        return TapErrors(0, {"ref": 0, "cand": 0, "gold": 0}, 0, zero, zero, 0.0, 0.0, 0.0, 0.0)
    rows = np.zeros((ROW_SUMS, gold.numel() // row)) if row else None
    out = _run(gold, ref, cand, scores, keep, math.inf, rows)
    gnorm, cn, rn = math.sqrt(out.ss_gold), math.sqrt(out.ss_cand), math.sqrt(out.ss_ref)
    hi = out.max_cand >= -out.min_cand  # torch's argmax/argmin: the first index of the extreme
    cand_stats = ErrorStats(
        out.max_cand if hi else -out.min_cand, ratio(cn, gnorm), out.argmax if hi else out.argmin, cn
    )
    nonfinite = {"ref": out.nonfinite_ref, "cand": out.nonfinite_cand, "gold": out.nonfinite_gold}
    return TapErrors(
        out.count,
        nonfinite,
        out.mask_diff,
        cand_stats,
        ErrorStats(out.absmax_ref, ratio(rn, gnorm), 0, rn),
        gnorm,
        out.absmax_gold,
        out.dot,
        math.sqrt(out.ss_diff),
        rows,
    )


def count_over(
    gold: torch.Tensor,
    ref: torch.Tensor,
    cand: torch.Tensor,
    limit: float,
    scores: bool = False,
    keep: torch.Tensor | None = None,
) -> int:
    """Judged elements (as in `tap_errors`) whose candidate |err| exceeds `limit`: a second pass."""
    return _run(gold, ref, cand, scores, keep, limit).over


def _run(gold, ref, cand, scores, keep, limit, rows: np.ndarray | None = None) -> _Out:
    sides = [t if t.dtype in _CODES else t.double() for t in (gold, ref, cand)]
    sides = [t if t.is_contiguous() else t.contiguous() for t in sides]
    if keep is not None:
        keep = keep.expand(gold.shape).contiguous().view(torch.uint8)
    base, stride = (rows.ctypes.data, rows.strides[0]) if rows is not None else (0, 0)
    a = _Args(
        (ctypes.c_void_p * 3)(*(t.data_ptr() for t in sides)),
        (ctypes.c_int * 3)(*(_CODES[t.dtype] for t in sides)),
        (ctypes.c_double * 3)(*(_MASKED_AT[t.dtype] for t in sides)),  # ids widened: no mask
        int(scores),
        keep.data_ptr() if keep is not None else None,
        limit,
        gold.numel() // rows.shape[1] if rows is not None else 0,
        (ctypes.c_void_p * ROW_SUMS)(*([] if rows is None else (base + i * stride for i in range(ROW_SUMS)))),
    )
    out = _Out()
    if _compare(gold.numel())(ctypes.byref(a), gold.numel(), ctypes.byref(out)):
        raise MemoryError("the comparison kernel could not allocate its partials")
    return out


#: most sides and largest k of `logits_rows`, as its kernel is built
MAX_SIDES, TOPK_MAX = 2, 16


@dataclass(frozen=True)
class LogitsRows:
    """Per row of the golden's and each side's logits: `top` [1 + sides, N, k] indices, largest first (column 0
    is the argmax); `kl` [sides, N] KL(softmax gold || softmax side), 0 where `ok` [sides, N] (both rows
    finite) is False."""

    top: torch.Tensor
    kl: torch.Tensor
    ok: torch.Tensor


def logits_rows(gold: torch.Tensor, *sides: torch.Tensor, k: int = 1) -> LogitsRows:
    """gold and up to two sides [N, V] -> `LogitsRows`, in one pass per row and tensor for the top k (a NaN
    counts as largest, equal values keep the earlier index, as torch.argmax) and one for the KLs, which reads
    the golden's row once for all sides."""
    if not 1 <= len(sides) <= MAX_SIDES or not 1 <= k <= min(TOPK_MAX, gold.shape[-1]):
        raise ValueError(f"logits_rows: 1 to {MAX_SIDES} sides and 1 <= k <= min({TOPK_MAX}, V)")
    ts = [(t if t.dtype in _CODES else t.double()).contiguous() for t in (gold, *sides)]
    n, v = gold.shape
    top = torch.empty(len(ts), n, k, dtype=torch.int64)
    kl, ok = torch.empty(len(sides), n, dtype=torch.float64), torch.empty(len(sides), n, dtype=torch.bool)
    _kernel().logits_rows(
        (ctypes.c_void_p * 3)(*(t.data_ptr() for t in ts)),
        (ctypes.c_int * 3)(*(_CODES[t.dtype] for t in ts)),
        len(sides),
        n,
        v,
        k,
        top.data_ptr(),
        kl.data_ptr(),
        ok.data_ptr(),
    )
    return LogitsRows(top, kl, ok)


def logits_counts(gold: torch.Tensor, *sides: torch.Tensor, k: int = 5) -> list[dict]:
    """gold and each side [B,T,V] -> per side, sums over tokens, in float64, that `agreement` turns into means
    (so that runs of rows compared apart add up): tokens, top-1 matches, top-k overlap, KL(gold || side) and
    finite rows. One fused pass per row of each tensor for the top k, one for the KLs."""
    flat = [t.reshape(-1, t.shape[-1]) for t in (gold, *sides)]
    k = min(k, flat[0].shape[-1])
    rows = logits_rows(*flat, k=k)
    gt = rows.top[0]
    out = []
    for s in range(len(sides)):
        st = rows.top[s + 1]
        overlap = float((st[:, :, None] == gt[:, None, :]).any(-1).double().sum()) / k
        ok = rows.ok[s]
        out.append(
            {
                "tokens": gt.shape[0],
                "top1": int((st[:, 0] == gt[:, 0]).sum()),
                "topk": overlap,
                "k": k,
                "kl": float(rows.kl[s][ok].sum()),
                "finite": int(ok.sum()),
            }
        )
    return out
