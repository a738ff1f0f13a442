"""Small helpers for the sentences the commands print."""

from __future__ import annotations

import re


def plural(n: int, noun: str) -> str:
    """`1 decode step`, `2 decode steps`, `0 decode steps`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def short(x: float, digits: int = 2) -> str:
    """A number in `digits` significant digits and as few characters as that allows: 1.5e30, 2.5e-30, 0.0031."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:.{digits}g}")
