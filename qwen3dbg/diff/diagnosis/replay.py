"""Qwen3's ops in float64 with the knobs bugs turn: what every hypothesis replays. Pure functions.

Shapes: B batch, T tokens of the step, S cache slots, nH/nKV heads, D head_dim, N output channels.
"""

from __future__ import annotations

import torch

from qwen3dbg.reference import qwen3
from qwen3dbg.reference.qwen3 import apply_rope, causal_mask, swiglu

#: Qwen3's own functions with nothing rounded: float64 throughout
_FLOAT64 = qwen3.Numerics(torch.float64)


def rms_norm(x: torch.Tensor, w: torch.Tensor | float, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in float64: the reference's own `rms_norm`, w * x / sqrt(mean(x^2) + eps)."""
    return qwen3.rms_norm(x.double(), w, eps, _FLOAT64)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (keys) in float64: the reference's own `softmax`."""
    return qwen3.softmax(x.double(), _FLOAT64)


def layer_norm(x: torch.Tensor, w: torch.Tensor | float, eps: float) -> torch.Tensor:
    """LayerNorm without bias over the last axis in float64: the mean subtracted, then as RMSNorm."""
    return rms_norm(x - x.mean(-1, keepdim=True), w, eps)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, interleaved: bool) -> torch.Tensor:
    """positions [B,T] -> angles [B,T,D] in float64. Halves (Qwen3): channel i and i + D/2 share
    frequency i; interleaved (GPT-J): channels 2i and 2i+1 share frequency i."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions.double()[..., None] * inv_freq
    return freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B,T,n,D] by angles [B,T,D], in float64."""
    return apply_rope(x.double(), angles.cos(), angles.sin())


def scores(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    kv_of_head: list[int],
    scale: float,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Attention scores in float64 from q [B,T,nH,D], a key cache [B,nKV,S,D] and query positions [B,T]
    -> [B,nH,T,S], future keys -inf when causal, and keys `window` or more positions back with a sliding
    window; query head h reads kv head kv_of_head[h]."""
    q, k = q.double().transpose(1, 2), k.double()[:, kv_of_head]
    out = q @ k.transpose(2, 3) * scale
    if causal:
        out = out.masked_fill(causal_mask(positions, k.shape[2]), float("-inf"))
    if window is not None:
        old = torch.arange(k.shape[2])[None, None, :] <= positions[:, :, None] - window  # [B,T,S]
        out = out.masked_fill(old[:, None], float("-inf"))
    return out


def context(probs: torch.Tensor, v: torch.Tensor, kv_of_head: list[int]) -> torch.Tensor:
    """probs [B,nH,T,S] @ v [B,nKV,S,D] -> attn_out [B,T,nH*D], heads transposed back and merged."""
    out = probs.double() @ v.double()[:, kv_of_head]
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    kv_of_head: list[int],
    scale: float,
    causal: bool = True,
    softmax_dim: int = -1,
    window: int | None = None,
) -> torch.Tensor:
    """Attention in float64 (see `scores`; v [B,nKV,S,D]) -> context [B,T,nH*D]. The knobs are where bugs live."""
    return context(scores(q, k, positions, kv_of_head, scale, causal, window).softmax(softmax_dim), v, kv_of_head)


def experts_mix(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert) -> torch.Tensor:
    """A MoE layer's output for tokens x [N,H] routed to ids [N,k] with weights [N,k]; `expert(e)` gives
    expert e's (gate_proj, up_proj, down_proj) weights in float64, or None when it has none."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for e, w in zip(ids[n].tolist(), weights[n]):
            mats = expert(int(e))
            if mats is None:
                return None
            gate, up, down = mats
            out[n] += w * (swiglu(gate @ x[n], up @ x[n]) @ down.T)
    return out
