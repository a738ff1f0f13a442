"""The streaming comparison on real tap stores with one planted change each: the first divergent tap,
its coordinate, the first op that produced a NaN, a changed mask, a routing tie versus a wrong expert,
and taps one side lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.metrics import router_margin
from qwen3dbg.run.capture import capture, forced_steps, run_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.schema import OPS_BY_NAME, parse_tap_name
from qwen3dbg.tapstore.store import StoreWriter, TapStore

PROMPT, DECODE = [9, 41, 7, 300, 12, 5, 77, 150], [3]


def clean_store(model_dir, dtype: str, out: Path, prompt: list[int] = PROMPT) -> Path:
    """scratch in `dtype` (bit-identical to HF eager) captured on `prompt` + DECODE."""
    return capture(load_candidate("scratch", model_dir, dtype), forced_steps(prompt, DECODE), out)


def rewrite(src: Path, dst: Path, edit: Callable[[int, str, torch.Tensor], torch.Tensor]) -> str:
    """Copy a store tap by tap through `edit(step, name, tensor)`; returns the `store:` side spec."""
    store = TapStore.open(src)
    with StoreWriter(dst, "engine", store.dtype, 1, extra={"config": store.manifest["config"]}) as w:
        for info in store.steps:
            names = store.names(info.step)
            w.begin_step(info, {n: tuple(store.get(info.step, n).shape) for n in names})
            for n in names:
                w(n, edit(info.step, n, store.get(info.step, n).clone()))
            w.end_step()
    return f"store:{dst}"


@pytest.fixture(scope="module")
def dense_bf16(catalogue_model, tmp_path_factory):
    model = catalogue_model("dense")
    return model, clean_store(model, "bfloat16", tmp_path_factory.mktemp("clean") / "store")


def test_one_wrong_element_is_the_first_divergence_with_its_coordinate(dense_bf16, tmp_path):
    model, src = dense_bf16

    def edit(step, name, t):
        if (step, name) == (0, "layers.1.v_proj"):
            t[0, 3, 7] += 4 * t.abs().max()
        return t

    result = run_diff("hf", rewrite(src, tmp_path / "c", edit), model_dir=model)
    d = result.first_divergence
    assert (d.step, d.layer, d.tap) == (0, 1, "layers.1.v_proj")
    assert d.worst == {"step": 0, "batch": 0, "token": 3, "head": 0, "channel": 7, "position": 3}
    assert result.exit_code == 1


def test_a_decode_step_reports_its_worst_element_at_its_absolute_position(dense_bf16, tmp_path):
    model, src = dense_bf16

    def edit(step, name, t):
        if (step, name) == (1, "layers.1.v_proj"):
            t[0, 0, 7] += 4 * t.abs().max()
        return t

    d = run_diff("hf", rewrite(src, tmp_path / "c", edit), model_dir=model).first_divergence
    assert (d.step, d.tap) == (1, "layers.1.v_proj")
    assert d.worst["token"] == 0 and d.worst["position"] == len(PROMPT)  # the step's one row, at position 8


def test_nan_is_traced_to_the_first_op_that_produced_it(dense_bf16, tmp_path):
    model, src = dense_bf16
    order = [t.name for t in run_diff("hf", f"store:{src}", model_dir=model).taps if t.step == 0]
    after = set(order[order.index("layers.0.o_proj") :])

    def edit(step, name, t):
        if (
            step == 0
            and name in after
            and t.is_floating_point()
            and OPS_BY_NAME[parse_tap_name(name)[1]].axes[1] == "T"
        ):
            t[0, 2] = float("nan")  # token 2 of every tap from o_proj on, as a real NaN spreads
        return t

    result = run_diff("hf", rewrite(src, tmp_path / "c", edit), model_dir=model)
    assert result.first_nonfinite["tap"] == "layers.0.o_proj"
    assert result.first_divergence.tap == "layers.0.o_proj" and "NaN" in result.first_divergence.reason


def test_nan_weights_are_not_judged_a_match_where_every_side_and_the_golden_is_nan(tmp_path):
    """A NaN in the checkpoint makes the golden NaN too: nothing can be judged from there on, and
    'no divergence' would read as a pass."""
    from qwen3dbg.model.synth import Plants, make_model

    model = make_model(tmp_path / "m", "tiny-dense", plants=Plants(nonfinite=("model.layers.1.mlp.up_proj.weight",)))
    result = run_diff("hf", "scratch", model_dir=model, token_ids=PROMPT)
    assert result.first_divergence is None and result.exit_code == 2
    assert result.golden_nonfinite["tap"] == "layers.1.mlp.up" and result.golden_nonfinite["step"] == 0
    assert "scan-checkpoint" in result.verdict and "golden" in result.verdict
    assert result.to_dict()["golden_nonfinite"] == result.golden_nonfinite


def test_finite_weights_leave_the_golden_finite(dense_bf16):
    model, src = dense_bf16
    result = run_diff("hf", f"store:{src}", model_dir=model)
    assert result.golden_nonfinite is None and result.exit_code == 0


def test_a_changed_mask_pattern_is_a_divergence_even_when_values_agree(dense_bf16, tmp_path):
    model, src = dense_bf16

    def edit(step, name, t):
        if (step, name) == (0, "layers.2.attn_scores"):
            t[0, 1, 0, 5] = 0.0  # query 0 now sees key 5, a future position
        return t

    result = run_diff("hf", rewrite(src, tmp_path / "c", edit), model_dir=model)
    assert result.first_divergence.tap == "layers.2.attn_scores"
    assert "mask pattern differs from fp64 at 1 entries" in result.first_divergence.reason


def test_taps_one_side_lacks_are_not_compared_and_never_divergent(catalogue_model):
    result = run_diff(
        "hf", "hf:attn=sdpa", model_dir=catalogue_model("dense"), dtype="bfloat16", token_ids=PROMPT, decode_ids=DECODE
    )
    assert {t.op for t in result.not_compared} == {"attn_scores", "attn_probs"}
    assert all("candidate lacks it" in t.reason for t in result.not_compared)
    assert result.first_divergence is None


LONG = [(7 * i + 3) % 500 for i in range(64)]  # enough tokens that one sits near a routing tie


@pytest.fixture(scope="module")
def moe_tie(catalogue_model, tmp_path_factory):
    """MoE model, clean bf16 store on LONG, fp64 layer-0 router logits [T,E], their top-2 margins [T], and
    the router logits' element tolerance of the clean store."""
    model = catalogue_model("moe")
    src = clean_store(model, "bfloat16", tmp_path_factory.mktemp("moe") / "s", LONG)
    clean = run_diff("hf", f"store:{src}", model_dir=model)
    logits = run_steps(load_candidate("scratch", model, "float64"), forced_steps(LONG, []))[0][
        "layers.0.moe.router_logits"
    ][0]
    tol = next(t.tol_abs for t in clean.taps if (t.step, t.name) == (0, "layers.0.moe.router_logits"))
    return model, src, logits, router_margin(logits, 2), tol


def _swap_kth(logits: torch.Tensor, token: int, k: int = 2):
    """Edit that makes the candidate pick the (k+1)-th expert instead of the k-th at `token`, and moves its
    two router logits past each other by exactly the fp64 margin."""
    order = logits[token].argsort(descending=True)
    kth, nxt = int(order[k - 1]), int(order[k])

    def edit(step, name, t):
        if step == 0 and name == "layers.0.moe.topk_ids":
            t[0, token][t[0, token] == kth] = nxt
        if step == 0 and name == "layers.0.moe.router_logits":
            t[0, token, kth], t[0, token, nxt] = logits[token, nxt].to(t.dtype), logits[token, kth].to(t.dtype)
        return t

    return edit


def test_a_changed_expert_within_the_router_noise_is_a_routing_tie_not_a_divergence(moe_tie, tmp_path):
    model, src, logits, margins, tol = moe_tie
    token = int(margins.argmin())
    assert float(margins[token]) < tol, "the prompt must hold a token whose margin is within the router noise"
    result = run_diff("hf", rewrite(src, tmp_path / "c", _swap_kth(logits, token)), model_dir=model)
    assert result.first_divergence is None, result.verdict
    assert (0, 0, token) in [(t["step"], t["layer"], t["token"]) for t in result.routing_ties]
    later = next(t for t in result.taps if t.step == 0 and t.name == "layers.0.mlp.out")
    assert token in later.extra["excluded_positions"]


def test_a_changed_expert_with_a_clear_router_margin_is_a_divergence(moe_tie, tmp_path):
    model, src, logits, margins, tol = moe_tie
    token = int(margins.argmax())
    assert float(margins[token]) > tol
    result = run_diff("hf", rewrite(src, tmp_path / "c", _swap_kth(logits, token)), model_dir=model)
    d = result.first_divergence
    assert d.tap == "layers.0.moe.router_logits" or (d.tap == "layers.0.moe.topk_ids" and "expert choice" in d.reason)


def test_the_reference_flipping_an_expert_at_a_near_tie_is_a_routing_tie_and_its_token_left_out(moe_tie, tmp_path):
    """The candidate routes as fp64 does; the reference picks the (k+1)-th expert where fp64's margin is
    within the reference's own router noise: that token is left out, as a candidate's tie is."""
    model, src, logits, margins, tol = moe_tie
    token = int(margins.argmin())
    ref = rewrite(src, tmp_path / "r", _swap_kth(logits, token))
    result = run_diff(ref, f"store:{src}", model_dir=model)
    assert result.first_divergence is None, result.verdict
    assert [(t["side"], t["token"]) for t in result.routing_ties if t["layer"] == 0] == [("ref", token)]
    later = next(t for t in result.taps if t.step == 0 and t.name == "layers.0.mlp.out")
    assert token in later.extra["excluded_positions"]


def test_the_reference_flipping_an_expert_with_a_clear_margin_is_not_excused(moe_tie, tmp_path):
    model, src, logits, margins, tol = moe_tie
    token = int(margins.argmax())
    ref = rewrite(src, tmp_path / "r", _swap_kth(logits, token))
    result = run_diff(ref, f"store:{src}", model_dir=model)
    assert token not in [t["token"] for t in result.routing_ties if t["side"] == "ref"]


def test_a_reference_tie_is_found_when_the_candidate_exposes_no_expert_ids(moe_tie, tmp_path):
    """The issue's case: the candidate has no top-k ids to compare, and the reference flips an expert at a
    near tie; the tie is still found from the reference's and the golden's ids and margins alone."""
    model, src, logits, margins, tol = moe_tie
    token = int(margins.argmin())
    ref = rewrite(src, tmp_path / "r", _swap_kth(logits, token))
    store = TapStore.open(src)
    with StoreWriter(
        tmp_path / "c",
        "engine",
        store.dtype,
        1,
        missing_taps=["moe.topk_ids"],
        extra={"config": store.manifest["config"]},
    ) as w:
        for info in store.steps:
            names = [n for n in store.names(info.step) if not n.endswith("moe.topk_ids")]
            w.begin_step(info, {n: tuple(store.get(info.step, n).shape) for n in names})
            for n in names:
                w(n, store.get(info.step, n))
            w.end_step()
    result = run_diff(ref, f"store:{tmp_path / 'c'}", model_dir=model)
    assert result.first_divergence is None, result.verdict
    assert [(t["side"], t["token"]) for t in result.routing_ties if t["layer"] == 0] == [("ref", token)]
