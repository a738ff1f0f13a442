"""The bug catalogue: the readable reference with one bug each, as porters actually write them."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from qwen3dbg.reference.qwen3 import Qwen3Reference, accumulate_lowp, attention_scores, rms_norm, rope_cos_sin

from qwen3dbg.util.errors import UserError


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
        return super().embed(ids) * self.config.hidden_size**0.5


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
        k_all[:, :, length - 1 : length - 1 + k.shape[2]] = k
        v_all[:, :, length - 1 : length - 1 + v.shape[2]] = v
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


# ---- long-context bugs: exact at short lengths, wrong from a length on ----------------------------


def _count_option(impl: str, name: str, value: int | str) -> int:
    """A positive whole-number option, as an int or as `NAME:key=value` passes it (a string)."""
    text = str(value)
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{impl} option {name}={value!r}: give a whole number of at least 1")
    return int(text)


class RopePositionsInDtype(Qwen3Reference):
    """Positions cast to the model dtype before the angle (`position_ids.to(hidden.dtype)`, or a table
    built from `torch.arange(n, dtype=model_dtype)`). bfloat16 holds whole numbers exactly only up to
    256, so from position 257 on the angle is a neighbour's (257 -> 256, 259 -> 260); float16 holds them
    up to 2048, float32 up to 2^24. Correct: integer positions, converted to float32 for the angle."""

    name = "rope-positions-lowp"

    def rope(self, positions):
        return super().rope(positions.to(self.dtype))


class SlidingWindowIgnoresFlag(Qwen3Reference):
    """Applies config.json's `sliding_window` although `use_sliding_window` is false (Qwen2.5 configs carry
    a window with the flag off, and transformers then attends over everything): a query at position p no
    longer sees the keys at p - window and before, so the first prompt longer than the window goes wrong.
    Correct: a window only when use_sliding_window is true."""

    name = "sliding-window-ignored"

    def mask(self, positions, k_len):
        mask = super().mask(positions, k_len)
        if self.config.sliding_window is None:
            return mask
        distance = positions[:, None, :, None] - torch.arange(k_len)
        return mask | (distance >= self.config.sliding_window)


def read_through_slots(kv: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """kv [B,nKV,S,D] by position, slot_of [S] the physical slot each position is written to -> the cache a
    reader sees [B,nKV,S,D]: every position reads its slot, which holds the last position written there."""
    last = torch.zeros(int(slot_of.max()) + 1, dtype=torch.long)
    last = last.scatter_reduce(0, slot_of, torch.arange(kv.shape[2]), "amax")
    return kv[:, :, last[slot_of]]


class SlotCache(Qwen3Reference):
    """A KV cache whose engine stores position p in physical slot `slot_of(p)` and reads it back from
    there (its cache taps are that view by position, as an engine's store writes them). Right while no
    two positions share a slot; once they do, the later one silently replaces the earlier."""

    @abstractmethod
    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [S] -> the physical slot each is written to [S]."""

    def update_cache(self, layer, k, v):
        k_all, v_all = super().update_cache(layer, k, v)
        slots = self.slot_of(torch.arange(k_all.shape[2]))
        self.cache[layer] = read_through_slots(k_all, slots), read_through_slots(v_all, slots)
        return self.cache[layer]


class RingCacheWraps(SlotCache):
    """A rolling KV cache of `slots` entries (Mistral's reference RotatingBufferCache: slot = p % slots),
    sized to a window that Qwen3 does not have: position `slots` overwrites position 0, `slots` + 1
    overwrites 1, and attention reads the newer keys and values in their place. Correct: a cache as long
    as the context (or a window only where the model has one). Option `slots` (default 512)."""

    name = "kv-ring-wrap"

    def __init__(self, model_dir, dtype="float64", *, slots: int | str = 512, stream_weights=None):
        super().__init__(model_dir, dtype, stream_weights=stream_weights)
        self.slots = _count_option(self.name, "slots", slots)

    def slot_of(self, positions):
        return positions % self.slots


class PagedCacheTableClamped(SlotCache):
    """A paged KV cache (pages of `page_size` slots, vLLM-style) whose per-sequence page table has a fixed
    width of `pages` entries (64 x 16: sized for a 1024-token max_model_len), and whose slot mapping clamps
    the page index to the table (`min(p // 16, 63)`, a guard against reading past it): from position 1024
    on, every new token is written into the last page, over positions 1008..1023. Correct: grow the
    table, or refuse a sequence longer than it. Options `pages` (64) and `page_size` (16)."""

    name = "paged-cache-clamped"

    def __init__(
        self, model_dir, dtype="float64", *, pages: int | str = 64, page_size: int | str = 16, stream_weights=None
    ):
        super().__init__(model_dir, dtype, stream_weights=stream_weights)
        self.pages = _count_option(self.name, "pages", pages)
        self.page_size = _count_option(self.name, "page_size", page_size)

    def slot_of(self, positions):
        page = (positions // self.page_size).clamp(max=self.pages - 1)
        return page * self.page_size + positions % self.page_size


class SplitKvUnscaledSums(Qwen3Reference):
    """Decode attention as a split-KV kernel computes it (flash-decoding; vLLM's paged attention v2 cuts the
    keys into partitions of 512): each partition of `partition` keys takes its softmax against its own max,
    then the partitions are combined, each weighted by its sum of exps. The combine forgets to rescale those
    sums (and partial outputs) to the common max, `exp(m_i - m)`, so a partition whose max is lower weighs
    as if it held the row's max. One partition is exact, and the prefill runs another kernel (one pass over
    all keys): decode steps past 512 keys go wrong. Nothing forms the attention matrices, so none are
    tapped. Correct: weights `l_i * exp(m_i - max_i m_i)`."""

    name = "split-kv-unscaled"
    missing_taps = frozenset({"attn_scores", "attn_probs"})

    def __init__(self, model_dir, dtype="float64", *, partition: int | str = 512, stream_weights=None):
        super().__init__(model_dir, dtype, stream_weights=stream_weights)
        self.partition = _count_option(self.name, "partition", partition)

    def attend(self, i, q, k_all, v_all, positions, sink):
        s = self.scores(q, k_all, self.mask(positions, k_all.shape[2])).to(self.num.wide)
        v = v_all.repeat_interleave(self.config.n_rep, dim=1).to(self.num.wide)
        size = self.partition if s.shape[-2] == 1 else s.shape[-1]  # a prefill: one pass, one partition
        weighted, total = 0.0, 0.0
        for start in range(0, s.shape[-1], size):
            part = s[..., start : start + size]
            e = torch.exp(part - part.amax(-1, keepdim=True))
            weighted = weighted + e @ v[:, :, start : start + size]  # the bug: both terms want a factor
            total = total + e.sum(-1, keepdim=True)  # exp(this partition's max - the row's max)
        out = (weighted / total).to(self.num.act)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class SoftmaxSumInDtype(Qwen3Reference):
    """A one-pass softmax that skips the max subtraction because QK-norm keeps the scores small: exp in
    float32, but the row sum kept in the activation dtype (the kernel's `scalar_t` scratch for the
    normalisation pass). In float16 a long row's sum passes 65504, becomes inf, and the whole row of
    probabilities collapses to 0, though no single exp need overflow; short rows, bfloat16 and float32
    are fine. Correct: subtract the row max, keep the sum in float32 (`F.softmax(s, -1, dtype=float32)`)."""

    name = "softmax-sum-overflow"

    def probs(self, scores):
        e = scores.to(self.num.wide).exp()
        return (e / e.sum(dim=-1, keepdim=True).to(self.num.act)).to(self.num.act)


# Each variant overrides one op of `Qwen3Reference` (two where the bug lives in a helper both ops share) and
# says in its docstring what is wrong and what the correct line is. `--cand NAME` runs one: qwen3dbg/run/registry.py
# lists them, and a test keeps that list in step with this one. `rmsnorm-fused` is the one clean variant: it rounds
# at another point, which is not a bug.
VARIANTS: dict[str, type[Qwen3Reference]] = {
    cls.name: cls
    for cls in (
        RopeInterleaved,
        RopeTheta1e4,
        QkNormOverHidden,
        SoftmaxWrongAxis,
        NoTransposeBeforeReshape,
        GhostBias,
        CausalMaskMissing,
        EmbedScaled,
        KvCacheOffByOne,
        GqaModulo,
        SoftmaxNoMax,
        MissingScale,
        LowPrecisionAccumulation,
        MoeTopkSoftmax,
        RmsNormFused,
        RopePositionsInDtype,
        SlidingWindowIgnoresFlag,
        RingCacheWraps,
        PagedCacheTableClamped,
        SplitKvUnscaledSums,
        SoftmaxSumInDtype,
    )
}
