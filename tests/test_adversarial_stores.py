"""Tap stores written by strangers: what validate-store and diff accept, refuse and explain (docs/bad-input.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPT, first_divergence
from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.config import load_config
from qwen3dbg.reference.qwen3 import Qwen3Reference
from qwen3dbg.store import TapStore
from qwen3dbg.validate import validate_store


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


def _rewrite_taps(store: Path, edit) -> None:
    """Pass every step file of `store` through `edit(step, taps) -> taps`."""
    for s in range(len(TapStore.open(store).steps)):
        f = store / f"step_{s:04d}.safetensors"
        save_file(edit(s, load_file(f)), f)


def _fp32_softmax(step, taps):
    """attn_probs as a bf16 engine with an fp32 softmax keeps them: from its own bf16 scores, not rounded back."""
    return taps | {n.replace("attn_scores", "attn_probs"): torch.softmax(t.float(), -1)
                   for n, t in taps.items() if n.endswith("attn_scores")}


def _golden_fp32(golden: Path):
    """Every float tap kept in fp32 as an engine more accurate than its store's dtype would: fp64 rounded once."""
    def edit(step, taps):
        gold = TapStore.open(golden)
        return {n: gold.get(step, n).float() if t.is_floating_point() else t for n, t in taps.items()}
    return edit


@pytest.mark.parametrize("kept_wider", ["fp32 attn_probs", "every tap in fp32"])
def test_a_bf16_store_with_taps_kept_in_fp32_validates_and_diffs_clean(tmp_path, dense, kept_wider):
    steps = forced_steps(PROMPT, [42])
    out = tmp_path / "store"
    capture(Qwen3Reference(dense, "bfloat16"), steps, out)
    if kept_wider == "fp32 attn_probs":
        _rewrite_taps(out, _fp32_softmax)
    else:
        capture(Qwen3Reference(dense, "float64"), steps, tmp_path / "golden")
        _rewrite_taps(out, _golden_fp32(tmp_path / "golden"))
    store = TapStore.open(out)
    assert store.dtype == torch.bfloat16 and store.get(0, "layers.0.attn_probs").dtype == torch.float32
    assert validate_store(out, load_config(dense)) == []
    assert first_divergence(dense, f"store:{out}") is None
