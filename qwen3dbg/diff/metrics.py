"""Error measures against the fp64 golden, pure functions in float64, below the fused kernels: per-tap
statistics (`fused` imports them), and the relative errors, ulp distances and fits that the diagnosis, teacher
forcing, the engine's selftest and the tests share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ErrorStats:
    """One side's error against the golden over the compared elements."""

    max_abs: float
    rel_l2: float
    argmax: int  # flat index of the worst element
    norm: float  # ||err||


def ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 0 and x/0 = inf."""
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def cosine(dot: float, gold_norm: float, err_norm: float) -> float:
    """Cosine of x = gold + err and gold from err . gold, ||gold|| and ||err||, without forming x."""
    if gold_norm == 0:
        return 1.0 if err_norm == 0 else 0.0
    x_norm2 = gold_norm**2 + 2 * dot + err_norm**2
    return (gold_norm**2 + dot) / (gold_norm * max(x_norm2, 0.0) ** 0.5) if x_norm2 > 0 else 0.0


#: how an axis of the schema reads in a coordinate
_COORD = {
    "T": "token",
    "S": "key",
    "nH": "head",
    "nKV": "head",
    "D": "channel",
    "H": "channel",
    "I": "channel",
    "E": "expert",
    "k": "slot",
    "V": "vocab",
}


def worst_coordinate(flat_index: int, shape: tuple[int, ...], axes: tuple[str, ...], step: int, head_dim: int) -> dict:
    """Flat index into a tap of `shape` with schema `axes` -> {"step", "batch", "token", "head", "channel", ...}.
    A merged axis `nH*D` splits into head and channel."""
    coord = {"step": step}
    idx = []
    for size in reversed(shape):  # in Python: torch.unravel_index imports sympy on first use (0.5 s)
        flat_index, i = divmod(flat_index, size) if size else (flat_index, 0)
        idx.append(i)
    for axis, i in zip(axes, reversed(idx)):
        if axis == "B":
            coord["batch"] = i
        elif "*" in axis:
            coord["head"], coord["channel"] = divmod(i, head_dim)
        else:
            coord[_COORD.get(axis, axis)] = i
    return coord


def agreement(counts: list[dict]) -> dict:
    """Folded `fused.logits_counts` -> top-1 agreement, mean top-k overlap and mean KL over the finite tokens."""
    n, finite = sum(c["tokens"] for c in counts), sum(c["finite"] for c in counts)
    k = counts[0]["k"]
    return {
        "top1_agreement": sum(c["top1"] for c in counts) / n,
        f"top{k}_overlap": sum(c["topk"] for c in counts) / n,
        "kl": sum(c["kl"] for c in counts) / finite if finite else float("nan"),
    }


def router_margin(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Router logits [..., E] -> gap between the k-th and (k+1)-th largest logit [...] (inf when E == k)."""
    if logits.shape[-1] <= k:
        return torch.full(logits.shape[:-1], float("inf"), dtype=torch.float64)
    top = logits.topk(k + 1, -1).values
    return (top[..., k - 1] - top[..., k]).double()


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer ids [..., k] -> bool [...]: the two sides chose the same set (order ignored)."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def rel(
    a: torch.Tensor, b: torch.Tensor, *, scale: torch.Tensor | None = None, where: torch.Tensor | None = None
) -> float:
    """||a - b|| / ||scale|| (scale defaults to b) in float64 over `where` (default: the entries where b is
    finite); inf when a is not finite there, or (default `where`) when b is not finite where a is: a replay
    of NaN/inf fits no finite tensor. NaN, "no evidence", when nothing is compared: never a perfect 0.0."""
    a, b = a.double(), b.double()
    finite_a = torch.isfinite(a)
    if where is None:
        ok = torch.isfinite(b)
        if bool((finite_a & ~ok).any()):
            return math.inf
    else:
        ok = where
    if not bool(ok.any()):
        return math.nan
    if bool((ok & ~finite_a).any()):
        return math.inf
    zero = a.new_zeros(())  # entries left out count as zeros: no copy of the kept ones (a long prompt's scores)
    den = float(torch.linalg.vector_norm((b if scale is None else scale.double()).where(ok, zero)))
    num = float(torch.linalg.vector_norm((a - b).where(ok, zero)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def ranked(x: float) -> float:
    """A residual as a sort key: "no evidence" (NaN) ranks last, never first."""
    return math.inf if math.isnan(x) else x


def fit_scale(c: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """Least-squares a with c ~ a * r over finite entries of both; returns (a, ||c - a r|| / ||c||)."""
    ok = torch.isfinite(r) & torch.isfinite(c)
    c, r = c[ok].double(), r[ok].double()
    rr = float(r @ r)
    if rr == 0:
        return 1.0, math.inf
    a = float(c @ r) / rr
    return a, rel(a * r, c)


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |a - b| over entries finite on both sides, in units in the last place of `dtype` at b's
    magnitude, where magnitudes under b's RMS count as the RMS (a near-zero element inherits its
    neighbours' absolute error); NaN when no entry is finite on both sides."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    if b.numel() == 0:
        return math.nan
    mag = b.abs().clamp_min(float(b.pow(2).mean().sqrt()) or torch.finfo(dtype).tiny)
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag)))
    return float(((a - b).abs() / spacing).max())


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two same-dtype tensors in representable steps (0: bit-identical; integer
    tensors: 0 or 1); infinities of the same sign are 0 apart."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if not a.is_floating_point():
        return int(not torch.equal(a, b))
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    sign = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(x):
        bits = x.contiguous().view(int_type).to(torch.int64)
        return torch.where(bits < 0, -(bits & sign), bits)

    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = (ordered(a) - ordered(b)).abs().masked_fill(both_inf, 0)
    return int(d.max()) if d.numel() else 0


def sample(n: int, k: int) -> torch.Tensor:
    """At most k indices spread evenly over range(n), first and last included."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()
