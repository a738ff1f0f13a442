"""Results as strict JSON: JSON has no NaN or inf, so non-finite floats become null and keys strings;
UTF-8 has no lone surrogates, so a string holding one is written with it escaped."""

from __future__ import annotations

import math

from qwen3dbg.text import utf8_text


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, str):
        return utf8_text(x)
    if isinstance(x, dict):
        return {utf8_text(str(k)): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
