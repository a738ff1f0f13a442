"""`qwen3dbg diff --ref hf --cand mine`: the CPU twin through the differ. Clean by default; the fused
RMSNorm switch stays in the noise; accumulating the products in bf16 is a divergence."""

from __future__ import annotations

import pytest
from helpers import DECODE, PROMPT

from qwen3dbg.diff import run_diff


def diff(cand: str, model_dir):
    return run_diff(ref="hf", cand=cand, model_dir=model_dir, dtype="bfloat16", token_ids=PROMPT, decode_ids=DECODE)


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_mine_with_default_switches_shows_no_divergence_from_hf(catalogue_model, model):
    result = diff("mine:device=cpu", catalogue_model(model))
    assert result.first_divergence is None, result.verdict
    cand = next(s for s in result.sides if s.role == "cand")
    assert cand.notes == ["ran the CPU twin (no CUDA device used)"]  # the report says which path ran


@pytest.fixture(scope="module")
def fused_on_hot_qk(catalogue_model):
    return diff("mine:device=cpu,rmsnorm=fused", catalogue_model("hot-qk"))


def test_fused_rmsnorm_switch_stays_in_the_noise_on_large_k_norm_weights(fused_on_hot_qk):
    assert fused_on_hot_qk.exit_code == 0 and fused_on_hot_qk.first_divergence is None, fused_on_hot_qk.verdict
    assert fused_on_hot_qk.in_noise is not None


def test_fused_rmsnorm_explanation_names_the_k_norm_rounding_point(fused_on_hot_qk):
    assert fused_on_hot_qk.in_noise.signature == "rounding_point", fused_on_hot_qk.in_noise.message
    assert "k_norm" in fused_on_hot_qk.in_noise.message


def test_bf16_accumulation_switch_is_reported_as_a_divergence(catalogue_model):
    result = diff("mine:device=cpu,accum=compute", catalogue_model("wide"))
    assert result.first_divergence is not None, result.verdict
    assert result.diagnosis[0].signature == "lowp_accumulation", result.diagnosis
