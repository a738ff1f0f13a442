"""Results as strict JSON: JSON has no NaN or inf, so non-finite floats become null and keys strings."""

from __future__ import annotations

import math


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
