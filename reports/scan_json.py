"""The JSON view of a ScanResult or WeightsDiffResult: the whole result (NaN and inf become null)."""

from __future__ import annotations

import json

from qwen3dbg.scan.findings import Verdict
from qwen3dbg.util.jsonio import json_safe


def render_json(result: Verdict) -> str:
    return json.dumps(json_safe(result.to_dict()), indent=1)
