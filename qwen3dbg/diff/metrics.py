"""Per-tap error metrics: pure functions of float64 tensors against the fp64 golden."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ErrorStats:
    """One side's error against the golden over the compared elements."""

    max_abs: float
    rel_l2: float
    argmax: int  # flat index of the worst element
    norm: float  # ||err||


def error_stats(err: torch.Tensor, gold_norm: float, err_norm: float, locate: bool = True) -> ErrorStats:
    """err = x - gold, float64 [...], zero where not compared, and its norm -> max |err| (and, with
    `locate`, where), ||err|| / ||gold||. Vectorised reductions and no temporary: the cost is memory traffic."""
    if err.numel() == 0:
        return ErrorStats(0.0, 0.0, 0, 0.0)
    flat = err.reshape(-1)
    if not locate:
        return ErrorStats(max_abs(flat), _ratio(err_norm, gold_norm), 0, err_norm)
    hi, lo = int(flat.argmax()), int(flat.argmin())
    i = hi if float(flat[hi]) >= -float(flat[lo]) else lo
    return ErrorStats(abs(float(flat[i])), _ratio(err_norm, gold_norm), i, err_norm)


def max_abs(x: torch.Tensor) -> float:
    """max |x| from max and min, two vectorised passes without a temporary (faster than an inf-norm)."""
    return max(float(x.max()), -float(x.min()))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def rel_diff(err_a: torch.Tensor, err_b: torch.Tensor, gold_norm: float) -> float:
    """||a - b|| / ||gold|| from both sides' errors to the golden: how far two sides are apart."""
    return _ratio(float(torch.dist(err_a, err_b)), gold_norm)


def cosine(err: torch.Tensor, gold: torch.Tensor, stats: ErrorStats, gold_norm: float) -> float:
    """Cosine of x = gold + err and gold [...] (zero where not compared), without forming x."""
    if gold_norm == 0:
        return 1.0 if stats.norm == 0 else 0.0
    dot = float(torch.dot(err.reshape(-1), gold.reshape(-1)))
    x_norm2 = gold_norm**2 + 2 * dot + stats.norm**2
    return (gold_norm**2 + dot) / (gold_norm * max(x_norm2, 0.0) ** 0.5) if x_norm2 > 0 else 0.0


def mismatch_share(err: torch.Tensor, max_abs: float, limit: float, count: int) -> float:
    """Share of the `count` compared elements whose |err| exceeds `limit` (none when max |err| does not)."""
    if not count or max_abs <= limit:
        return 0.0
    return float(torch.count_nonzero(err.abs() > limit)) / count


#: how an axis of the schema reads in a coordinate
_COORD = {"T": "token", "S": "key", "nH": "head", "nKV": "head", "D": "channel", "H": "channel",
          "I": "channel", "E": "expert", "k": "slot", "V": "vocab"}


def worst_coordinate(flat_index: int, shape: tuple[int, ...], axes: tuple[str, ...], step: int, head_dim: int) -> dict:
    """Flat index into a tap of `shape` with schema `axes` -> {"step", "batch", "token", "head", "channel", ...}.
    A merged axis `nH*D` splits into head and channel."""
    coord = {"step": step}
    idx = torch.unravel_index(torch.tensor(flat_index), shape)
    for axis, size, i in zip(axes, shape, (int(v) for v in idx)):
        if axis == "B":
            coord["batch"] = i
        elif "*" in axis:
            coord["head"], coord["channel"] = divmod(i, head_dim)
        else:
            coord[_COORD.get(axis, axis)] = i
    return coord


def logits_agreement(cand: torch.Tensor, gold: torch.Tensor, k: int = 5, rows: int = 16) -> dict:
    """cand, gold [B,T,V] -> top-1 agreement, mean top-k overlap and mean KL(gold || cand) over tokens,
    in float64, `rows` tokens at a time (a real vocabulary makes each row 1 MB in float64)."""
    c, g = cand.reshape(-1, cand.shape[-1]), gold.reshape(-1, gold.shape[-1])
    k = min(k, c.shape[-1])
    top1 = overlap = kl = 0.0
    finite = 0
    for i in range(0, c.shape[0], rows):
        cc, gg = c[i:i + rows].double(), g[i:i + rows].double()
        top1 += float((cc.argmax(-1) == gg.argmax(-1)).sum())
        ct, gt = cc.topk(k, -1).indices, gg.topk(k, -1).indices
        overlap += float((ct[:, :, None] == gt[:, None, :]).any(-1).double().sum()) / k
        lg, lc = torch.log_softmax(gg, -1), torch.log_softmax(cc, -1)
        ok = torch.isfinite(lc).all(-1) & torch.isfinite(lg).all(-1)
        kl += float((lg.exp() * (lg - lc)).sum(-1)[ok].sum())
        finite += int(ok.sum())
    n = c.shape[0]
    return {"top1_agreement": top1 / n, f"top{k}_overlap": overlap / n, "kl": kl / finite if finite else float("nan")}


def router_margin(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Router logits [..., E] -> gap between the k-th and (k+1)-th largest logit [...] (inf when E == k)."""
    if logits.shape[-1] <= k:
        return torch.full(logits.shape[:-1], float("inf"), dtype=torch.float64)
    top = logits.topk(k + 1, -1).values
    return (top[..., k - 1] - top[..., k]).double()


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer ids [..., k] -> bool [...]: the two sides chose the same set (order ignored)."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)
