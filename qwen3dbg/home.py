"""Where qwen3dbg keeps what it makes for itself (default models, cached runs, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def home(*parts: str) -> Path:
    """$QWEN3DBG_HOME (default ~/.cache/qwen3dbg), joined with `parts`."""
    return Path(os.environ.get("QWEN3DBG_HOME", Path.home() / ".cache" / "qwen3dbg")).joinpath(*parts)
