"""Tensor names of Qwen3 / Qwen3-MoE in Hugging Face checkpoints and in GGUF files, both ways."""

from __future__ import annotations

import re

import gguf

ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe"}  # HF model_type -> GGUF general.architecture
MODEL_TYPE = {v: k for k, v in ARCH.items()}

_T = gguf.MODEL_TENSOR
_GLOBAL = {"model.embed_tokens": _T.TOKEN_EMBD, "model.norm": _T.OUTPUT_NORM, "lm_head": _T.OUTPUT}
_LAYER = {
    "input_layernorm": _T.ATTN_NORM,
    "post_attention_layernorm": _T.FFN_NORM,
    "self_attn.q_proj": _T.ATTN_Q,
    "self_attn.k_proj": _T.ATTN_K,
    "self_attn.v_proj": _T.ATTN_V,
    "self_attn.o_proj": _T.ATTN_OUT,
    "self_attn.q_norm": _T.ATTN_Q_NORM,
    "self_attn.k_norm": _T.ATTN_K_NORM,
    "mlp.gate_proj": _T.FFN_GATE,
    "mlp.up_proj": _T.FFN_UP,
    "mlp.down_proj": _T.FFN_DOWN,
    "mlp.gate": _T.FFN_GATE_INP,
}
_EXPERT = {"gate_proj": _T.FFN_GATE_EXP, "up_proj": _T.FFN_UP_EXP, "down_proj": _T.FFN_DOWN_EXP}

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")

_GGUF_GLOBAL = {gguf.TENSOR_NAMES[t]: hf for hf, t in _GLOBAL.items()}
_GGUF_LAYER_PART = {gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}."): hf for hf, t in _LAYER.items()}
_GGUF_EXPERT_PART = {gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}."): p for p, t in _EXPERT.items()}


def hf_to_gguf(name: str) -> tuple[str, int | None] | None:
    """GGUF name of an HF tensor and, for an expert, its index in the stacked tensor; None if unmapped."""
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL:
        return f"{gguf.TENSOR_NAMES[_GLOBAL[stem]]}.{suffix}", None
    m = _HF_LAYER.fullmatch(name)
    if not m:
        return None
    layer, part, suffix = int(m[1]), m[2], m[3]
    if part in _LAYER:
        return f"{gguf.TENSOR_NAMES[_LAYER[part]].format(bid=layer)}.{suffix}", None
    e = _HF_EXPERT.fullmatch(part)
    if e:
        return f"{gguf.TENSOR_NAMES[_EXPERT[e[2]]].format(bid=layer)}.{suffix}", int(e[1])
    return None


# GGUF stacks a layer's experts into one tensor per projection (`blk.N.ffn_gate_exps.weight`, [num_experts, rows,
# cols] in torch order), so one GGUF name can stand for many HF names.
def gguf_to_hf(name: str, num_experts: int = 0) -> list[str]:
    """The HF name(s) a GGUF tensor holds: one, or one per expert for a stacked tensor; [] if unmapped."""
    stem, _, suffix = name.rpartition(".")
    if stem in _GGUF_GLOBAL:
        return [f"{_GGUF_GLOBAL[stem]}.{suffix}"]
    m = _GGUF_LAYER.fullmatch(name)
    if not m:
        return []
    prefix = f"model.layers.{m[1]}."
    if m[2] in _GGUF_LAYER_PART:
        return [f"{prefix}{_GGUF_LAYER_PART[m[2]]}.{m[3]}"]
    if m[2] in _GGUF_EXPERT_PART:
        return [f"{prefix}mlp.experts.{e}.{_GGUF_EXPERT_PART[m[2]]}.{m[3]}" for e in range(num_experts)]
    return []


def gguf_shapes(hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """GGUF names and torch-order shapes of the tensors a converter makes from these HF tensors.

    Unmapped HF names are left out; experts are stacked in index order.
    """
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[str, int] = {}
    for name, shape in hf_shapes.items():
        mapped = hf_to_gguf(name)
        if mapped is None:
            continue
        g, e = mapped
        if e is None:
            out[g] = tuple(shape)
        else:
            experts[g] = max(experts.get(g, 0), e + 1)
            out[g] = (experts[g], *shape)
    return out
