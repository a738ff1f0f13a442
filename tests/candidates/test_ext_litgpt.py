"""`--cand litgpt`: litgpt's own Qwen3 and Qwen3-MoE through candidates/mappings/litgpt_qwen3.toml."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from helpers import DECODE, PROMPT, first_divergence

from qwen3dbg.model.config import load_config
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.tapstore.validate import validate_store
from qwen3dbg.util.errors import UserError

# Needs litgpt's model code (`pip install --no-deps litgpt==0.5.13 && pip install '.[litgpt]'`, as .ci/run does):
# skipped without it, except under CI=true, where a missing install fails the run.
needs_litgpt = pytest.mark.skipif(
    importlib.util.find_spec("litgpt") is None and os.environ.get("CI") != "true",
    reason="litgpt is not installed (pip install --no-deps litgpt==0.5.13 && pip install '.[litgpt]')",
)


@needs_litgpt
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_litgpt_agrees_with_the_reference(models, preset, dtype):
    assert first_divergence(models(preset), "litgpt", dtype) is None


@needs_litgpt
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_litgpt_store_is_valid_and_lacks_only_what_sdpa_hides(models, tmp_path, preset):
    capture(load_candidate("litgpt", models(preset), "float32"), forced_steps(PROMPT, DECODE), tmp_path / "s")
    store = TapStore.open(tmp_path / "s")
    assert validate_store(tmp_path / "s", load_config(models(preset))) == []
    assert sorted(store.missing_taps) == ["attn_probs", "attn_scores"]
    assert store.get(0, "layers.0.k_cache").shape[2] == len(PROMPT), "the cache, cut to the positions filled"


BUGGY_LITGPT = '''
from qwen3dbg.candidates.ports import litgpt_qwen3 as port

TAP_MAPPING = port.TAP_MAPPING


def load(model_dir, dtype):
    """litgpt with layer 1's {what} loaded the wrong way round."""
    model = port.load(model_dir, dtype)
    w = model.transformer.h[1].mlp
    {plant}
    return model
'''
PLANTS = {  # preset -> (what is swapped, the statement swapping it, where the diff must point)
    "tiny-dense": (
        "gate_proj and up_proj",
        "w.fc_1.weight.data, w.fc_2.weight.data = w.fc_2.weight.data, w.fc_1.weight.data",
        "step 0: layers.1.mlp.gate",
    ),
    "tiny-moe": (
        "router rows of experts 0 and 1",
        "w.gate.weight.data[[0, 1]] = w.gate.weight.data[[1, 0]]",
        "step 0: layers.1.moe.router_logits",
    ),
}


@needs_litgpt
@pytest.mark.parametrize("preset", sorted(PLANTS))
def test_a_bug_planted_in_litgpt_is_found_through_the_same_mapping(models, tmp_path, preset):
    what, plant, found = PLANTS[preset]
    (tmp_path / "buggy.py").write_text(BUGGY_LITGPT.format(what=what, plant=plant))
    assert first_divergence(models(preset), f"module:{tmp_path / 'buggy.py'}:load", "float32") == found


@needs_litgpt
def test_litgpt_ignores_norm_topk_prob_false_and_the_diff_says_where(models):
    """litgpt 0.5.13 always softmaxes the k picked logits: right for norm_topk_prob true only."""
    assert first_divergence(models("tiny-moe-nonorm"), "litgpt", "float32") == "step 0: layers.0.moe.topk_weights"


def test_without_litgpt_the_candidate_says_how_to_install_it(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "litgpt.model", None)  # an import of it now fails, installed or not
    with pytest.raises(UserError, match=r"pip install --no-deps litgpt==0\.5\.13 && pip install '\.\[litgpt\]'"):
        load_candidate("litgpt", models("tiny-dense"), "float32")


@needs_litgpt
def test_litgpt_attends_over_the_positions_filled_not_its_whole_cache(models, monkeypatch):
    """As litgpt's own generate runs it: a step's attention reads the cache up to its last position, so a
    long prompt costs the scores of its own length, not of its whole cache."""
    import torch
    import torch.nn.functional as F

    from qwen3dbg.run.candidate import NullSink

    keys, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        keys.append(k.shape[2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    cand = load_candidate("litgpt", models("tiny-dense"), "float32")
    cand.reset()
    for info in forced_steps(PROMPT, DECODE):
        keys.clear()
        cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), NullSink())
        assert set(keys) == {info.positions[0][-1] + 1}, (info.step, keys)


@needs_litgpt
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_litgpt_cache_grows_with_the_positions_and_keeps_what_it_held(models, monkeypatch, dtype):
    """A cache grown every two positions (the prompt and each decode step cross a boundary) still gives every
    step what the reference gives: the slots filled before a growth are carried over."""
    import torch

    from qwen3dbg.candidates.ports import litgpt_qwen3 as port

    monkeypatch.setattr(port, "CACHE_CHUNK", 2)
    assert first_divergence(models("tiny-dense"), "litgpt", dtype) is None
    model = port.load(models("tiny-dense"), getattr(torch, dtype))
    model(torch.tensor([PROMPT]), input_pos=torch.arange(len(PROMPT)))
    assert model.transformer.h[0].attn.kv_cache.k.shape[2] == len(PROMPT) + 1, "whole chunks of 2, no more"


@needs_litgpt
def test_litgpt_tied_lm_head_is_the_embedding_not_a_copy(models):
    import torch

    from qwen3dbg.candidates.ports import litgpt_qwen3 as port

    assert load_config(models("tiny-dense")).tie_word_embeddings
    model = port.load(models("tiny-dense"), torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
