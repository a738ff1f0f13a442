"""A from-scratch Qwen3 in the style of the popular standalone code (a `cfg` dict, small modules, dense only, no
KV cache): the worked example of `--cand module:...`, mapped by candidates/mappings/standalone_qwen3.toml."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

TAP_MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "standalone_qwen3.toml"


def compute_rope_params(head_dim: int, theta_base: float, context_length: int, dtype=torch.float32):
    """cos, sin [context_length, head_dim] for rotate-half RoPE (angles in float32, as transformers)."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.arange(context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] at positions 0..T-1; cos, sin [context_length, D]."""
    seq_len, head_dim = x.shape[2], x.shape[3]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:seq_len][None, None] + rotated * sin[:seq_len][None, None]


class RMSNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim, dtype=dtype))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.scale * x.to(dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False, dtype=cfg["dtype"])

    def forward(self, x):
        return self.fc3(nn.functional.silu(self.fc1(x)) * self.fc2(x))


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_kv_groups, self.head_dim = cfg["n_heads"], cfg["n_kv_groups"], cfg["head_dim"]
        self.group_size = self.num_heads // self.num_kv_groups
        d_out = self.num_heads * self.head_dim
        self.W_query = nn.Linear(cfg["emb_dim"], d_out, bias=False, dtype=cfg["dtype"])
        self.W_key = nn.Linear(cfg["emb_dim"], self.num_kv_groups * self.head_dim, bias=False, dtype=cfg["dtype"])
        self.W_value = nn.Linear(cfg["emb_dim"], self.num_kv_groups * self.head_dim, bias=False, dtype=cfg["dtype"])
        self.out_proj = nn.Linear(d_out, cfg["emb_dim"], bias=False, dtype=cfg["dtype"])
        self.q_norm = RMSNorm(self.head_dim, cfg["eps"], cfg["dtype"])
        self.k_norm = RMSNorm(self.head_dim, cfg["eps"], cfg["dtype"])

    def forward(self, x, mask, cos, sin):
        b, num_tokens, _ = x.shape
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)
        attn_scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, float("-inf"))
        attn_weights = torch.softmax(attn_scores * self.head_dim**-0.5, dim=-1, dtype=torch.float32).to(x.dtype)
        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, -1)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = GroupedQueryAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], cfg["eps"], cfg["dtype"])
        self.norm2 = RMSNorm(cfg["emb_dim"], cfg["eps"], cfg["dtype"])

    def forward(self, x, mask, cos, sin):
        x = x + self.att(self.norm1(x), mask, cos, sin)
        return x + self.ff(self.norm2(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], cfg["eps"], cfg["dtype"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        cos, sin = compute_rope_params(cfg["head_dim"], cfg["rope_base"], cfg["context_length"], cfg["dtype"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = cfg

    def forward(self, in_idx):
        # no KV cache, like the code it imitates: every call runs the whole sequence, so the adapter re-runs
        # the prefix at each decode step
        x = self.tok_emb(in_idx)
        n = in_idx.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
        for block in self.trf_blocks:
            x = block(x, mask, self.cos, self.sin)
        return self.out_head(self.final_norm(x))


def config_from_hf(hf: dict, dtype: torch.dtype) -> dict:
    """The `cfg` dict from a Hugging Face config.json (note head_dim is explicit: not emb_dim // n_heads)."""
    return {
        "vocab_size": hf["vocab_size"],
        "context_length": min(hf.get("max_position_embeddings", 4096), 8192),
        "emb_dim": hf["hidden_size"],
        "n_heads": hf["num_attention_heads"],
        "n_layers": hf["num_hidden_layers"],
        "hidden_dim": hf["intermediate_size"],
        "head_dim": hf["head_dim"],
        "n_kv_groups": hf["num_key_value_heads"],
        "rope_base": hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta")),
        "eps": hf.get("rms_norm_eps", 1e-6),
        "tie": hf.get("tie_word_embeddings", False),
        "dtype": dtype,
    }


def load_weights(model: Qwen3Model, weights: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face-named tensors into the port's modules."""

    def put(param, name):
        with torch.no_grad():
            param.copy_(weights[name].to(param.dtype))

    put(model.tok_emb.weight, "model.embed_tokens.weight")
    for i, block in enumerate(model.trf_blocks):
        p = f"model.layers.{i}."
        att = block.att
        for mine, theirs in (
            (att.W_query, "q_proj"),
            (att.W_key, "k_proj"),
            (att.W_value, "v_proj"),
            (att.out_proj, "o_proj"),
        ):
            put(mine.weight, p + f"self_attn.{theirs}.weight")
        put(att.q_norm.scale, p + "self_attn.q_norm.weight")
        put(att.k_norm.scale, p + "self_attn.k_norm.weight")
        put(block.norm1.scale, p + "input_layernorm.weight")
        put(block.norm2.scale, p + "post_attention_layernorm.weight")
        for mine, theirs in ((block.ff.fc1, "gate_proj"), (block.ff.fc2, "up_proj"), (block.ff.fc3, "down_proj")):
            put(mine.weight, p + f"mlp.{theirs}.weight")
    put(model.final_norm.scale, "model.norm.weight")
    put(model.out_head.weight, "model.embed_tokens.weight" if model.cfg["tie"] else "lm_head.weight")


def load(model_dir, dtype=torch.float32) -> Qwen3Model:
    """The factory `--cand module:qwen3dbg.candidates.ports.standalone_qwen3:load` calls."""
    import json

    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    if hf.get("model_type") != "qwen3":
        raise ValueError("the standalone port runs dense Qwen3 (model_type 'qwen3') only")
    model = Qwen3Model(config_from_hf(hf, dtype))
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    load_weights(model, weights)
    return model.eval()
