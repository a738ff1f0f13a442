"""Dtype names as the tap format writes them (torch's) and every alias a reader accepts."""

from __future__ import annotations

import torch

from qwen3dbg.util.errors import UserError

_BY_NAME = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _BY_NAME[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(
            f"unknown dtype {name!r}: use float32/fp32, bfloat16/bf16, float16/fp16 or float64/fp64"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name ('bfloat16'), the spelling a store's manifest uses."""
    return str(dtype).removeprefix("torch.")
