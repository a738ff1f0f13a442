"""The JSON view of a SelftestResult: the whole result, with the bandwidth limit and the problems it derives."""

from __future__ import annotations

import json

from qwen3dbg.candidates.mine.selftest import SelftestResult


def render_json(result: SelftestResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
