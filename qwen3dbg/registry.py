"""Implementations by name: the one place `--impl`, `--ref` and `--cand` are resolved.

Entries are import paths, so naming an implementation imports only what it needs.
"""

from __future__ import annotations

import importlib

from qwen3dbg.candidate import Candidate
from qwen3dbg.errors import UserError

IMPLEMENTATIONS: dict[str, str] = {
    "hf": "qwen3dbg.reference.hf:HFCandidate",
    "scratch": "qwen3dbg.reference.qwen3:Qwen3Reference",
    "mine": "qwen3dbg.candidates.mine.engine:MineCandidate",
}


def register(name: str, target: str) -> None:
    IMPLEMENTATIONS[name] = target


def names() -> list[str]:
    return sorted(IMPLEMENTATIONS)


def load_candidate(name: str, model_dir, dtype, **options) -> Candidate:
    """Instantiate implementation `name` for a model directory in a dtype."""
    if name not in IMPLEMENTATIONS:
        raise UserError(f"unknown implementation {name!r}: choose one of {', '.join(names())}")
    module, _, attr = IMPLEMENTATIONS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(model_dir, dtype, **options)
