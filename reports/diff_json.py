"""The JSON view of a DiffResult: the whole result; CI jobs read `first_divergence` and `diagnosis`."""

from __future__ import annotations

import json

from qwen3dbg.diff.result import DiffResult


def render_json(result: DiffResult) -> str:
    return json.dumps(result.to_dict(), indent=1) + "\n"
