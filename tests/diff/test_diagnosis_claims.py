"""No claim without a proof that distinguishes (issue 27): each wrong claim the diagnosis once made is now
silent or right, and the in-noise and systematic notes state no cause they have not replayed."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3dbg.run.capture import forced_steps, run_steps
from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import load_config
from qwen3dbg.diff import run_diff
from qwen3dbg.diff.diagnosis.site import Site, ulps_phrase
from qwen3dbg.diff.metrics import rel, ulps
from qwen3dbg.reference.qwen3 import Qwen3Reference, accumulate_lowp
from qwen3dbg.run.registry import IMPLEMENTATIONS


def test_a_relative_error_over_nothing_is_no_evidence_not_a_perfect_fit():
    a = torch.ones(4)
    assert math.isnan(rel(a, a, where=torch.zeros(4, dtype=torch.bool)))
    assert math.isnan(ulps(a, torch.full((4,), math.nan), torch.bfloat16))


def test_a_replay_of_nonfinite_values_fits_no_finite_tensor():
    finite = torch.randn(8, dtype=torch.float64)
    assert rel(finite, torch.full_like(finite, -math.inf)) == math.inf
    masked = torch.tensor([1.0, -math.inf])  # entries both sides mask still compare as before
    assert rel(masked, masked.clone()) == 0.0


def test_under_half_an_ulp_is_never_worded_as_zero_ulps():
    assert ulps_phrase(0.3, "bfloat16") == "less than half a bfloat16 ulp"
    assert ulps_phrase(2.0, "bfloat16") == "2 bfloat16 ulps"


class _Memory:
    """A TapSource over one in-memory run of the reference on both sides."""

    def __init__(self, model_dir):
        ref = Qwen3Reference(model_dir, "bfloat16")
        self.config, self.dtype = ref.config, torch.bfloat16
        self.steps = forced_steps([5, 9, 14, 2], [7])
        self._run, self._ckpt = run_steps(ref, self.steps), Checkpoint(model_dir)

    def cand(self, step, name):
        return self._run[step].get(name)

    ref = gold = cand

    def weight(self, name):
        return self._ckpt.get(name) if name in self._ckpt else None


def test_a_replay_reads_only_what_is_computed_before_its_op(catalogue_model):
    s = Site(_Memory(catalogue_model("dense")), 1, 0, "q_proj")
    assert s.operand("layers.0.attn_norm") is not None  # the op's own input
    assert s.operand("layers.0.attn_scores", step=0) is not None  # an earlier step's
    assert s.operand("layers.0.attn_scores") is None  # computed after q_proj: data flow forbids it
    assert s.operand("layers.0.q_proj") is None  # the tap itself explains nothing
    assert s.operand("layers.0.attn_norm", step=2) is None  # a later step's


@pytest.mark.parametrize(
    "cand,products",
    [("lowp-accumulation", "each product rounded"), ("mine:device=cpu,accum=compute", "products exact")],
)
def test_low_precision_accumulation_on_a_tiny_model_is_named_by_a_replay_that_reproduces_it(
    catalogue_model, cand, products
):
    """Once 'q_proj is computed from attn_scores' (an op after it, sharing only an element count) with a
    residual of 0.0: the replay on masked scores was all -inf and a relative error over nothing read as 0.
    Now named only through the gate: a running bf16 sum, replayed on the candidate's own input the way it
    rounds its products, reproduces it (the catalogue rounds each product, mine's loop adds them exactly)."""
    result = run_diff(ref="hf", cand=cand, model_dir=catalogue_model("dense"), dtype="bfloat16")
    assert result.first_divergence is not None, result.verdict
    assert [d.signature for d in result.diagnosis] == ["lowp_accumulation"], [d.message for d in result.diagnosis]
    ev = result.diagnosis[0].evidence
    assert ev["products"] == products and ev["residual_in_noise"] <= 1, ev
    assert ev["rel_err"] > ev["replay_fp32_rel_err"], ev


class LowpDescending(Qwen3Reference):
    """Matmuls with one running bf16 sum taken from the last product to the first: low accumulation in an
    order no replay takes."""

    def linear(self, x, name):
        return accumulate_lowp(x.flip(-1), self.w[name + ".weight"].flip(-1))


def test_low_precision_accumulation_in_another_order_is_not_named_without_a_replay_that_reproduces_it(
    catalogue_model, monkeypatch
):
    monkeypatch.setitem(IMPLEMENTATIONS, "lowp-descending", f"{__name__}:LowpDescending")
    result = run_diff(ref="hf", cand="lowp-descending", model_dir=catalogue_model("wide"), dtype="bfloat16")
    assert result.first_divergence is not None, result.verdict
    assert "lowp_accumulation" not in [d.signature for d in result.diagnosis], [d.message for d in result.diagnosis]


def _no_unreplayed_cause(finding) -> None:
    """An in-noise or systematic note names a rounding cause only with the replay that showed it (the share
    of values that replay reproduces bit for bit is its evidence)."""
    if finding is None:
        return
    replayed = any(k.startswith("share_matching") for k in finding.evidence)
    assert replayed or "no cause" in finding.message or "no replay" in finding.message, finding
    if not replayed:
        assert "rounding order" not in finding.message and "not a bug" not in finding.message, finding.message
    assert " 0 bfloat16 ulps" not in finding.message and " 0 float16 ulps" not in finding.message, finding.message


def test_a_wrong_rmsnorm_eps_in_the_noise_is_reported_as_systematic_with_its_evidence(catalogue_model, monkeypatch):
    """eps 1e-5 for 1e-6 shrinks every normalised row; layer 0's RMSNorm reads the embedding, bit-identical on
    both sides, so its rows' deviations are its own and all move down: no rounding order does that."""
    monkeypatch.setitem(IMPLEMENTATIONS, "eps-1e-5", "qwen3dbg.candidates.planted:RmsNormEps1e5")
    model = catalogue_model("dense")
    assert load_config(model).rms_norm_eps == 1e-6
    result = run_diff(ref="hf", cand="eps-1e-5", model_dir=model, dtype="bfloat16", token_ids=list(range(3, 51)))
    assert result.first_divergence is None, result.verdict  # in the noise: only the systematic test sees it
    found = result.systematic
    assert found is not None and found.tap == "layers.0.attn_norm" and found.signature == "systematic_scale", found
    ev = found.evidence
    assert ev["fitted_scale"] < 0 and ev["rows_down"] > ev["rows_up"] and ev["p"] < ev["threshold"], ev
    assert result.to_dict()["systematic"]["evidence"]["rows_down"] == ev["rows_down"]
    _no_unreplayed_cause(result.in_noise)
    _no_unreplayed_cause(found)


@pytest.mark.parametrize(
    "cand,model,dtype",
    [
        ("hf:attn=sdpa", "dense", "bfloat16"),
        ("hf:attn=sdpa", "dense", "float16"),
        ("rmsnorm-fused", "hot-qk", "bfloat16"),
        ("rmsnorm-fused", "dense", "bfloat16"),
    ],
)
def test_notes_of_pairs_that_differ_only_in_rounding_order_state_no_cause_they_did_not_replay(
    catalogue_model, cand, model, dtype
):
    result = run_diff(ref="hf", cand=cand, model_dir=catalogue_model(model), dtype=dtype)
    assert result.first_divergence is None, result.verdict
    assert result.systematic is None, result.systematic.message
    _no_unreplayed_cause(result.in_noise)
