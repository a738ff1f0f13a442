"""Small helpers for the sentences the commands print."""

from __future__ import annotations


def plural(n: int, noun: str) -> str:
    """`1 decode step`, `2 decode steps`, `0 decode steps`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
