"""The bug catalogue: the readable reference with ONE bug each, as porters actually write them.

Each variant overrides one op of `Qwen3Reference` (two where the bug lives in a helper both ops
share) and says in its docstring what is wrong and what the correct line is. Run any of them with
`--cand NAME`: qwen3dbg/registry.py lists them, and a test keeps that list in step with `VARIANTS`.
`rmsnorm-fused` is the one clean variant: it rounds at another point, which is not a bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3dbg.diagnosis import accumulate_lowp
from qwen3dbg.reference.qwen3 import Qwen3Reference, attention_scores, rms_norm, rope_cos_sin


class RopeInterleaved(Qwen3Reference):
    """cos/sin concatenated on the wrong dim: the angle halves are stacked on a new last axis and
    flattened (GPT-J's interleaved layout), so channels 2i and 2i+1 share an angle while
    rotate_half pairs channel i with i + D/2. Correct: `torch.cat((freqs, freqs), dim=-1)`."""

    name = "rope-interleaved"

    def rope(self, positions):
        cos, sin = super().rope(positions)
        half = self.config.head_dim // 2
        return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)


class RopeTheta1e4(Qwen3Reference):
    """rope_theta hard-coded to Llama-2's 1e4 instead of the config's (Qwen3: 1e6)."""

    name = "rope-theta-1e4"

    def rope(self, positions):
        return rope_cos_sin(positions, self.config.head_dim, 1e4, self.num)


class QkNormOverHidden(Qwen3Reference):
    """q_norm/k_norm computed over all heads jointly (the whole projection, like OLMo-2's q_norm)
    instead of over head_dim per head."""

    name = "qk-norm-over-hidden"

    def head_norm(self, x, name):
        n_heads = x.shape[-2]
        w = self.w[name + ".weight"].repeat(n_heads)
        return rms_norm(x.flatten(-2), w, self.config.rms_norm_eps, self.num).view_as(x)


class SoftmaxWrongAxis(Qwen3Reference):
    """Softmax over the query axis (dim=-2) instead of the key axis (dim=-1)."""

    name = "softmax-wrong-axis"

    def probs(self, scores):
        return F.softmax(scores, dim=-2, dtype=self.num.wide).to(self.num.act)


class NoTransposeBeforeReshape(Qwen3Reference):
    """The context [B,nH,T,D] is reshaped to [B,T,nH*D] without transposing heads and tokens back."""

    name = "no-transpose"

    def context(self, probs, v):
        out = torch.matmul(probs, v.repeat_interleave(self.config.n_rep, dim=1))
        return out.reshape(out.shape[0], out.shape[2], -1)


class GhostBias(Qwen3Reference):
    """Adds every `.bias` tensor it finds in the checkpoint, although Qwen3's config says
    attention_bias false (a converter left q/k/v/o biases behind; Qwen2 had them)."""

    name = "ghost-bias"

    def linear(self, x, name):
        y = super().linear(x, name)
        return y + self.w[name + ".bias"] if name + ".bias" in self.w.ckpt else y


class CausalMaskMissing(Qwen3Reference):
    """No causal mask in the prefill: every token attends to the tokens after it."""

    name = "no-causal-mask"

    def scores(self, q, k, mask):
        return attention_scores(q, k, self.config.n_rep, torch.zeros_like(mask))


class EmbedScaled(Qwen3Reference):
    """Embeddings multiplied by sqrt(hidden_size), as Gemma does; Qwen3 does not scale them."""

    name = "embed-scaled"

    def embed(self, ids):
        return super().embed(ids) * self.config.hidden_size ** 0.5


class KvCacheOffByOne(Qwen3Reference):
    """Decode writes the new key/value at slot `length - 1` (the last filled slot) instead of
    `length` (the next free one): it overwrites the previous token and leaves the newest slot empty.
    The prefill writes its slots in bulk and is right, so only decode steps see it."""

    name = "kv-cache-off-by-one"

    def update_cache(self, layer, k, v):
        past = self.cache[layer]
        if past is None:
            return super().update_cache(layer, k, v)
        length = past[0].shape[2]
        k_all = torch.cat((past[0], torch.zeros_like(k)), dim=2)
        v_all = torch.cat((past[1], torch.zeros_like(v)), dim=2)
        k_all[:, :, length - 1: length - 1 + k.shape[2]] = k
        v_all[:, :, length - 1: length - 1 + v.shape[2]] = v
        self.cache[layer] = (k_all, v_all)
        return k_all, v_all


def kv_heads_by_modulo(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B,nKV,S,D] -> [B,nH,S,D] with query head h reading kv head h % nKV (the bug; right: h // n_rep)."""
    return kv[:, torch.arange(n_heads) % kv.shape[1]]


class GqaModulo(Qwen3Reference):
    """GQA head mapping by modulo: query head h reads kv head h % n_kv instead of h // n_rep."""

    name = "gqa-modulo"

    def scores(self, q, k, mask):
        return attention_scores(q, kv_heads_by_modulo(k, q.shape[1]), 1, mask)

    def context(self, probs, v):
        out = torch.matmul(probs, kv_heads_by_modulo(v, probs.shape[1]))
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class SoftmaxNoMax(Qwen3Reference):
    """Softmax as exp(x) / sum(exp(x)) in the activation dtype, without subtracting the row max:
    in float16 exp overflows for scores above log(65504) = 11.09 and the row becomes NaN."""

    name = "softmax-no-max"

    def probs(self, scores):
        e = scores.exp()
        return e / e.sum(dim=-1, keepdim=True)


class MissingScale(Qwen3Reference):
    """Attention scores without the 1/sqrt(head_dim) scale."""

    name = "missing-scale"

    def scores(self, q, k, mask):
        k = k.repeat_interleave(self.config.n_rep, dim=1)
        return torch.matmul(q, k.transpose(2, 3)).masked_fill(mask, float("-inf"))


class LowPrecisionAccumulation(Qwen3Reference):
    """Matmuls that multiply and accumulate in the activation dtype, one product at a time (a
    hand-written kernel's `bf16 acc` instead of `float acc`): the running sum is rounded to bfloat16
    after every product, so the error grows with the reduction length. Exact in float32 up to order."""

    name = "lowp-accumulation"

    def linear(self, x, name):
        return accumulate_lowp(x, self.w[name + ".weight"])


class MoeTopkSoftmax(Qwen3Reference):
    """Router softmax over the k selected logits (Mixtral's order) where Qwen3-MoE with
    norm_topk_prob false takes the softmax over ALL experts and keeps the top-k probabilities as
    they are. Indistinguishable when norm_topk_prob is true."""

    name = "moe-topk-softmax"

    def route(self, logits):
        top, ids = torch.topk(logits, self.config.num_experts_per_tok, dim=-1)
        return ids, F.softmax(top, dim=-1, dtype=self.num.wide).to(self.num.act)


class RmsNormFused(Qwen3Reference):
    """CLEAN: RMSNorm that multiplies by the weight in float32 and rounds once (a fused kernel),
    where transformers rounds the normalised value first. At most an ulp or so apart per element,
    which a k_norm weight of ~100 makes visible but not wrong."""

    name = "rmsnorm-fused"

    def norm(self, x, name):
        w = self.w[name + ".weight"]
        xw = x.to(self.num.wide)
        xw = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return (w.to(self.num.wide) * xw).to(self.num.act)


VARIANTS: dict[str, type[Qwen3Reference]] = {cls.name: cls for cls in (
    RopeInterleaved, RopeTheta1e4, QkNormOverHidden, SoftmaxWrongAxis, NoTransposeBeforeReshape, GhostBias,
    CausalMaskMissing, EmbedScaled, KvCacheOffByOne, GqaModulo, SoftmaxNoMax, MissingScale,
    LowPrecisionAccumulation, MoeTopkSoftmax, RmsNormFused,
)}
CLEAN = frozenset({RmsNormFused.name})
