"""Bugs below the noise floor, planted to measure the systematic-deviation detector (bench/bench_systematic.py
and tests/diff): the catalogue's bugs diverge, these stay within the noise."""

from __future__ import annotations

import torch
from qwen3dbg.reference.qwen3 import Qwen3Reference, rms_norm


def shifted(x: torch.Tensor, dtype: torch.dtype, ulps: float) -> torch.Tensor:
    """x (wide) moved by `ulps` of `dtype` at each element's own magnitude, then rounded to dtype."""
    x = x.double()
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))))
    return (x + ulps * spacing).to(dtype)


class RmsNormEps1e5(Qwen3Reference):
    """Every RMSNorm with eps 1e-5 where the config says 1e-6: in bf16 on a tiny model, about the noise."""

    def norm(self, x, name):
        return rms_norm(x, self.w[name + ".weight"], 1e-5, self.num)


class ShiftedAttnNorm(Qwen3Reference):
    """Layer 1's input_layernorm output moved up by 0.2 ulp before its one rounding: systematic, in the noise."""

    def norm(self, x, name):
        if name != "model.layers.1.input_layernorm" or self.dtype == torch.float64:
            return super().norm(x, name)
        xw = x.double()
        xhat = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return shifted(self.w[name + ".weight"].double() * xhat, self.dtype, 0.2)
