"""The long-context bugs of the catalogue: each is exact up to some length and wrong from the next token
on, and the differ names its first divergent (step, layer, tap) at exactly that length, while the same
candidate one token shorter is clean. Every expected place below follows from the bug's mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from qwen3dbg.reference.qwen3 import Qwen3Reference

from qwen3dbg.diff import run_diff
from qwen3dbg.run.candidate import DictSink
from qwen3dbg.tapstore.schema import tap_name
from qwen3dbg.util.errors import UserError


def ids(n: int) -> list[int]:
    """n token ids, the same prefix for every n (so a shorter run is a prefix of the longer one)."""
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(13)).tolist()


def first_divergence(cand: str, model_dir, dtype: str, tokens: int, decode: bool):
    """(step, layer, tap) where `cand` first diverges from scratch on `tokens` tokens: all of them the
    prompt, or the last one a decode step; None when clean."""
    prompt = tokens - 1 if decode else tokens
    every = ids(tokens)
    result = run_diff(
        ref="scratch",
        cand=cand,
        model_dir=model_dir,
        dtype=dtype,
        token_ids=every[:prompt],
        decode_ids=every[prompt:] or None,
    )
    d = result.first_divergence
    return None if d is None else (d.step, d.layer, d.tap)


@dataclass(frozen=True)
class LongCase:
    cand: str
    model: str  # tests/conftest.py CATALOGUE_MODELS key
    dtype: str
    tokens: int  # the bug acts first on the token at position tokens - 1
    decode: bool  # that token is a decode step (else the last token of the prompt)
    op: str  # the first tap that sees the bug, in layer 0

    @property
    def first(self) -> tuple[int, int, str]:
        return (1 if self.decode else 0, 0, tap_name(self.op, 0))


CASES = [
    # bfloat16 rounds position 257 to 256 (the first whole number it cannot hold); q_rope is the first
    # tap made from the angle. float32 holds every position.
    LongCase("rope-positions-lowp", "dense", "bfloat16", 258, False, "q_rope"),
    LongCase("rope-positions-lowp", "dense", "bfloat16", 258, True, "q_rope"),
    # The query at position `window` is the first to lose a key (position 0): the mask, in the scores.
    # (The window-512 model's config carries a window that only this bug reads.)
    LongCase("sliding-window-ignored", "window-512", "bfloat16", 513, True, "attn_scores"),
    LongCase("sliding-window-ignored", "window-64", "float32", 65, False, "attn_scores"),
    # position `slots` is written into slot 0, over position 0: the cache the step leaves
    LongCase("kv-ring-wrap", "window-512", "bfloat16", 513, True, "k_cache"),
    LongCase("kv-ring-wrap:slots=64", "dense", "float32", 65, False, "k_cache"),
    # position pages x page_size is the first past the table, written into its last page
    LongCase("paged-cache-clamped", "dense", "bfloat16", 1025, True, "k_cache"),
    LongCase("paged-cache-clamped:pages=4,page_size=8", "dense", "float32", 33, False, "k_cache"),
    LongCase("paged-cache-clamped:pages=5,page_size=16", "dense", "bfloat16", 81, True, "k_cache"),
    # the first decode step over more than one partition of keys; no attention matrices are tapped,
    # so the context is the first tap the combine reaches
    LongCase("split-kv-unscaled", "window-512", "bfloat16", 513, True, "attn_out"),
    LongCase("split-kv-unscaled:partition=64", "dense", "float32", 65, True, "attn_out"),
]


def _id(case: LongCase) -> str:
    return f"{case.cand}@{case.tokens}{'-decode' if case.decode else ''}-{case.dtype}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_long_bug_is_found_exactly_where_it_first_acts(catalogue_model, case):
    assert first_divergence(case.cand, catalogue_model(case.model), case.dtype, case.tokens, case.decode) == case.first


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_long_bug_is_invisible_one_token_shorter(catalogue_model, case):
    assert first_divergence(case.cand, catalogue_model(case.model), case.dtype, case.tokens - 1, case.decode) is None


def _first_overflowing_row(model_dir, tokens: int) -> tuple[int, int, float]:
    """(position, layer, largest exp in that row) of the first row, lowest layer first among equals, whose
    float32 sum of exp(score) is inf once stored in float16, read off the float16 reference's own scores."""
    ref = Qwen3Reference(model_dir, "float16")
    n_layers = ref.config.num_hidden_layers
    sink = DictSink({tap_name("attn_scores", i) for i in range(n_layers)})
    ref.step(torch.tensor([ids(tokens)]), torch.arange(tokens)[None], sink)
    rows = []
    for layer in range(n_layers):
        exps = sink.taps[tap_name("attn_scores", layer)].float().exp()[0]  # [nH,T,S]
        over = exps.sum(-1).half().isinf()  # [nH,T]
        if over.any():
            position = int(over.any(0).nonzero()[0])
            rows.append((position, layer, float(exps[over[:, position], position].amax())))
    assert rows, f"no float16 row sum overflows within {tokens} tokens: the warm-qk model is too cool"
    return min(rows)


def test_softmax_sum_overflow_is_found_at_the_first_row_whose_float16_sum_overflows(catalogue_model):
    position, layer, largest = _first_overflowing_row(catalogue_model("warm-qk"), 400)
    assert position > 64 and largest < torch.finfo(torch.float16).max, "the sum of a long row overflows, no exp"
    assert first_divergence("softmax-sum-overflow", catalogue_model("warm-qk"), "float16", position + 1, False) == (
        0,
        layer,
        tap_name("attn_probs", layer),
    )
    assert first_divergence("softmax-sum-overflow", catalogue_model("warm-qk"), "float16", position, False) is None


def test_softmax_sum_overflow_is_clean_where_the_dtype_has_the_range(catalogue_model):
    assert first_divergence("softmax-sum-overflow", catalogue_model("warm-qk"), "bfloat16", 400, False) is None


@pytest.mark.parametrize(
    "cand",
    [
        "kv-ring-wrap:slots=0",
        "paged-cache-clamped:pages=many",
        "split-kv-unscaled:partition=-4",
        "paged-cache-clamped:page_size=1.5",
    ],
)
def test_a_length_option_that_is_no_whole_number_is_refused_in_one_sentence(catalogue_model, cand):
    with pytest.raises(UserError, match="give a whole number of at least 1"):
        run_diff(ref="scratch", cand=cand, model_dir=catalogue_model("dense"), token_ids=ids(4))
