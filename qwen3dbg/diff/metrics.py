"""Per-tap error metrics against the fp64 golden: pure functions, below the fused kernels (`fused` imports
them; nothing here calls a kernel)."""

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
