"""Qwen3 and Qwen3-MoE from scratch, written to be read: the template a porter follows, and in float64 the
golden every tolerance is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import open_model
from qwen3dbg.run.candidate import Candidate, NullSink, emit, option_flag
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.dtypes import parse_dtype


# One readable forward pass that emits every tap of the schema. In float64 all of it runs in float64, RoPE angles,
# norms and softmax included. In float32, bfloat16 and float16 it rounds exactly where transformers rounds (see
# `Numerics`), so it agrees with HF eager bit for bit or within an ulp of a matmul's accumulation order.
# Shapes: B batch, T tokens of the step, S cache length, H hidden, nH/nKV heads, D head_dim, I intermediate,
# E experts, k experts per token, V vocab.
@dataclass(frozen=True)
class Numerics:
    """Where values are rounded. `act` is the dtype activations and weights live in; `wide` is the
    dtype transformers uses for RMSNorm statistics, softmax and RoPE angles (float32, or float64
    in the golden, which is float64 from end to end)."""

    act: torch.dtype

    @property
    def wide(self) -> torch.dtype:
        return torch.float64 if self.act == torch.float64 else torch.float32


# ---- pure math ------------------------------------------------------------------------------------


def accumulate_lowp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K].T with every product and running sum rounded to x's dtype: how an engine
    that accumulates in the activation dtype rounds, and what the diagnosis replays to recognise one."""
    acc = torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    for k in range(x.shape[-1]):
        acc = acc + x[..., k, None] * w[:, k]
    return acc


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, num: Numerics) -> torch.Tensor:
    """RMSNorm over the last axis. Normalise in the wide dtype, round to `act`, THEN multiply by the
    weight (transformers' order; a large weight, e.g. k_norm ~100, amplifies that rounding)."""
    xw = x.to(num.wide)
    xw = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xw.to(num.act)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, num: Numerics):
    """cos, sin [B,T,D] for rotate-half RoPE: angle(p, i) = p * theta^(-2i/D), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(num.wide) / head_dim))
    freqs = positions[..., None].to(num.wide) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(num.act), emb.sin().to(num.act)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last axis (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,T,nHeads,D], cos/sin [B,T,D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x * cos) + (rotate_half(x) * sin)


def causal_mask(q_positions: torch.Tensor, k_len: int) -> torch.Tensor:
    """True where query at position p may not see key slot s (s > p). q_positions [B,T] -> [B,1,T,S]."""
    slots = torch.arange(k_len, device=q_positions.device)
    return (slots[None, None, :] > q_positions[:, :, None])[:, None]


def attention_scores(q: torch.Tensor, k: torch.Tensor, n_rep: int, mask: torch.Tensor) -> torch.Tensor:
    """q [B,nH,T,D], k [B,nKV,S,D] -> scaled scores [B,nH,T,S], masked entries -inf.
    GQA: query head h reads kv head h // n_rep."""
    k = k.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return scores.masked_fill(mask, float("-inf"))


def softmax(scores: torch.Tensor, num: Numerics) -> torch.Tensor:
    """Softmax over keys in the wide dtype, rounded back to `act` (as transformers' eager path)."""
    return F.softmax(scores, dim=-1, dtype=num.wide).to(num.act)


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool, num: Numerics):
    """Router logits [N,E] -> (top-k ids [N,k] by descending weight, weights [N,k] in `act`).
    Softmax over ALL experts in the wide dtype, top-k, renormalise only when norm_topk_prob."""
    probs = F.softmax(logits, dim=-1, dtype=num.wide)
    weights, ids = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(num.act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---- the model ------------------------------------------------------------------------------------


class Weights:
    """Checkpoint tensors converted to the compute dtype on first use. With `stream`, a layer's
    tensors are dropped after the layer runs, so the float64 golden of a large MoE holds one layer."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, stream: bool):
        self.ckpt, self.dtype, self.stream = ckpt, dtype, stream
        self.cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        """A checkpoint tensor; `experts.{e}.gate_up_proj.weight` is gate_proj's rows then up_proj's, the
        weight transformers fuses at load (one GEMM over it can round otherwise than two in float32)."""
        if name not in self.cache:
            base, fused, _ = name.rpartition("gate_up_proj.weight")
            parts = (base + "gate_proj.weight", base + "up_proj.weight") if fused else (name,)
            self.cache[name] = torch.cat([self.ckpt.get(n, self.dtype) for n in parts])
        return self.cache[name]

    def done_with_layer(self, layer: int) -> None:
        if self.stream:
            prefix = f"model.layers.{layer}."
            for name in [n for n in self.cache if n.startswith(prefix)]:
                del self.cache[name]


class Qwen3Reference(Candidate):
    """The readable Qwen3. Each op is a method so that a catalogue variant can override exactly one."""

    name = "scratch"
    supports_layer = True
    fresh_taps = True  # every op makes a new tensor; the cache grows by concatenation

    def __init__(self, model_dir, dtype="float64", *, stream_weights: bool | str | None = None):
        model = open_model(model_dir, check_layout=False)
        self.config: Qwen3Config = model.config
        self.dtype = parse_dtype(dtype)
        self.num = Numerics(self.dtype)
        ckpt = model.checkpoint
        if stream_weights is None:  # hold everything unless that exceeds ~8 GB
            stream_weights = ckpt.numel() * self.dtype.itemsize > 8 * 1024**3
        else:
            stream_weights = option_flag("scratch", "stream_weights", stream_weights)
        self.w = Weights(ckpt, self.dtype, stream_weights)
        self.reset()

    def reset(self) -> None:
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.config.num_hidden_layers

    # -- ops (override points for the bug catalogue) --

    def embed(self, ids):
        return F.embedding(ids, self.w["model.embed_tokens.weight"])

    def linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"])

    def norm(self, x, name):
        return rms_norm(x, self.w[name + ".weight"], self.config.rms_norm_eps, self.num)

    def head_norm(self, x, name):
        """q_norm / k_norm: RMSNorm over head_dim, per head. x [B,T,nHeads,D]."""
        return self.norm(x, name)

    def rope(self, positions):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.num)

    def apply_rope(self, x, cos, sin):
        return apply_rope(x, cos, sin)

    def update_cache(self, layer, k, v):
        """Append this step's k, v [B,nKV,T,D] and return the whole cache [B,nKV,S,D]."""
        past = self.cache[layer]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.cache[layer] = (k, v)
        return k, v

    def mask(self, positions, k_len):
        return causal_mask(positions, k_len)

    def scores(self, q, k, mask):
        return attention_scores(q, k, self.config.n_rep, mask)

    def probs(self, scores):
        return softmax(scores, self.num)

    def context(self, probs, v):
        """probs [B,nH,T,S] @ v [B,nKV,S,D] -> attn_out [B,T,nH*D] (heads transposed back, then merged)."""
        out = torch.matmul(probs, v.repeat_interleave(self.config.n_rep, dim=1))
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    def attend(self, i, q, k_all, v_all, positions, sink):
        """q [B,nH,T,D] over the cache [B,nKV,S,D] -> context [B,T,nH*D]; emits scores and probabilities."""
        scores = self.scores(q, k_all, self.mask(positions, k_all.shape[2]))
        probs = self.probs(scores)
        emit(sink, i, "attn_scores", scores), emit(sink, i, "attn_probs", probs)
        return self.context(probs, v_all)

    def residual(self, x, normed):
        """What the attention adds to: the layer's raw input x, not its normalised copy."""
        return x

    def route(self, logits):
        c = self.config
        return route(logits, c.num_experts_per_tok, c.norm_topk_prob, self.num)

    # -- blocks --

    def attention(self, i, x, positions, sink):
        c, p = self.config, f"model.layers.{i}.self_attn."
        B, T, _ = x.shape
        q, k, v = self.linear(x, p + "q_proj"), self.linear(x, p + "k_proj"), self.linear(x, p + "v_proj")
        emit(sink, i, "q_proj", q), emit(sink, i, "k_proj", k), emit(sink, i, "v_proj", v)
        q = self.head_norm(q.view(B, T, c.num_attention_heads, c.head_dim), p + "q_norm")
        k = self.head_norm(k.view(B, T, c.num_key_value_heads, c.head_dim), p + "k_norm")
        emit(sink, i, "q_norm", q), emit(sink, i, "k_norm", k)
        cos, sin = self.rope(positions)
        q, k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
        emit(sink, i, "q_rope", q), emit(sink, i, "k_rope", k)
        v = v.view(B, T, c.num_key_value_heads, c.head_dim)
        k_all, v_all = self.update_cache(i, k.transpose(1, 2), v.transpose(1, 2))
        emit(sink, i, "k_cache", k_all), emit(sink, i, "v_cache", v_all)
        out = self.attend(i, q.transpose(1, 2), k_all, v_all, positions, sink)
        emit(sink, i, "attn_out", out)
        out = self.linear(out, p + "o_proj")
        emit(sink, i, "o_proj", out)
        return out

    def dense_mlp(self, i, x, sink):
        p = f"model.layers.{i}.mlp."
        gate, up = self.linear(x, p + "gate_proj"), self.linear(x, p + "up_proj")
        act = swiglu(gate, up)
        emit(sink, i, "mlp.gate", gate), emit(sink, i, "mlp.up", up), emit(sink, i, "mlp.act", act)
        return self.linear(act, p + "down_proj")

    def moe_mlp(self, i, x, sink):
        """Route each token to k experts and mix their SwiGLU outputs. Like transformers' eager
        experts: accumulate expert by expert (ascending id) in the activation dtype, gather each
        expert's tokens slot-major (top-1 picks first), since a GEMM's rounding depends on row order,
        and compute gate and up in one GEMM over the fused weight."""
        c, p = self.config, f"model.layers.{i}.mlp."
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits = self.linear(flat, p + "gate")
        ids, weights = self.route(logits)
        emit(sink, i, "moe.router_logits", logits.view(B, T, -1))
        emit(sink, i, "moe.topk_ids", ids.view(B, T, -1))
        emit(sink, i, "moe.topk_weights", weights.view(B, T, -1))
        out = torch.zeros_like(flat)
        for e in range(c.num_experts):
            slot, token = torch.where(ids.T == e)
            if token.numel() == 0:
                continue
            pe = p + f"experts.{e}."
            h = swiglu(*self.linear(flat[token], pe + "gate_up_proj").chunk(2, dim=-1))
            y = self.linear(h, pe + "down_proj") * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.view(B, T, H)

    def layer(self, i, x, positions, sink):
        p = f"model.layers.{i}."
        h = self.norm(x, p + "input_layernorm")
        emit(sink, i, "attn_norm", h)
        x = self.residual(x, h) + self.attention(i, h, positions, sink)
        emit(sink, i, "resid_mid", x)
        h = self.norm(x, p + "post_attention_layernorm")
        emit(sink, i, "mlp_norm", h)
        h = self.moe_mlp(i, h, sink) if self.config.is_moe_layer(i) else self.dense_mlp(i, h, sink)
        emit(sink, i, "mlp.out", h)
        x = x + h
        emit(sink, i, "resid_out", x)
        self.w.done_with_layer(i)
        return x

    def logits(self, x):
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return F.linear(x, self.w[name])

    @torch.no_grad()
    def step(self, ids, positions, sink: TapSink = NullSink()):
        x = self.embed(ids)
        emit(sink, None, "embed", x)
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, positions, sink)
        x = self.norm(x, "model.norm")
        emit(sink, None, "final_norm", x)
        logits = self.logits(x)
        emit(sink, None, "logits", logits)
        return logits

    @torch.no_grad()
    def run_layer(self, layer, hidden, positions, past_kv, sink):
        saved = self.cache[layer]
        self.cache[layer] = past_kv
        try:
            return self.layer(layer, hidden.to(self.dtype), positions, sink)
        finally:
            self.cache[layer] = saved
