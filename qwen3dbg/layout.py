"""The on-disk layout of a released Qwen3 checkpoint: its file names and every tensor's name and shape.

Torch-free, so the checkpoint scanner reads a safetensors checkpoint without loading torch.
"""

from __future__ import annotations

from qwen3dbg.config import Qwen3Config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def tensor_shapes(cfg: Qwen3Config, ghost_bias: bool = False) -> dict[str, tuple[int, ...]]:
    """The on-disk names and shapes of a released checkpoint of this config, in a stable order."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if ghost_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)}
        if cfg.is_moe_layer(i):
            e_i = cfg.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                shapes |= {p + f"mlp.experts.{e}.gate_proj.weight": (e_i, h),
                           p + f"mlp.experts.{e}.up_proj.weight": (e_i, h),
                           p + f"mlp.experts.{e}.down_proj.weight": (h, e_i)}
        else:
            inter = cfg.intermediate_size
            shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)}
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
