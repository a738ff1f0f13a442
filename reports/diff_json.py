"""The JSON view of a DiffResult: the whole result; CI jobs read `first_divergence` and `diagnosis`."""

from __future__ import annotations

import json
from pathlib import Path

from qwen3dbg.diff.result import DiffResult


def write_json(result: DiffResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=1) + "\n")
