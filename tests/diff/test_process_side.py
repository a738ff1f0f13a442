"""A live reference in a process of its own (`qwen3dbg.diff.process_side`): the same verdicts as in the diff's
process, greedy steps and the cache cut passed to it as the run goes, its failures told as the side's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qwen3dbg.diff.run as diff_run
from qwen3dbg.diff.process_side import RemoteImplementation
from qwen3dbg.diff.run import diff_plan
from qwen3dbg.run.inputs import RunInputs
from qwen3dbg.run.plan import plan_run
from qwen3dbg.run.sides import parse_side
from qwen3dbg.util.errors import UserError

PROMPT = list(range(3, 43))


def _diff(model, cand: str, inputs: RunInputs, ref_process: bool | None, said: list | None = None):
    plan = plan_run({"ref": "hf", "cand": cand}, model, inputs)
    return diff_plan(plan, ref_process=ref_process, status=(said.append if said is not None else lambda m: None))


def _verdicts(result):
    return [(t.step, t.name, t.status) for t in result.taps]


@pytest.mark.parametrize(
    "cand,preset",
    [("rmsnorm-fused", "dense"), ("kv-cache-off-by-one", "dense"), ("moe-topk-softmax", "moe")],
)
def test_the_same_verdicts_as_a_reference_in_the_diffs_process(catalogue_model, cand, preset):
    """Every tap's verdict, the first divergence and the reference's own noise agree; the reference's numbers
    agree to its dtype's rounding (the child decodes on one thread: another order of its sums)."""
    inputs = RunInputs(PROMPT, None, [5, 6, 7, 8], None)
    here, there = (_diff(catalogue_model(preset), cand, inputs, p) for p in (False, True))
    assert _verdicts(there) == _verdicts(here)
    assert (there.first_divergence is None) == (here.first_divergence is None)
    if here.first_divergence is not None:
        a, b = here.first_divergence, there.first_divergence
        assert (a.step, a.tap, a.origin) == (b.step, b.tap, b.origin)
    for a, b in zip(here.taps, there.taps):
        if a.status == "ok":
            assert b.ref_rel_l2 == pytest.approx(a.ref_rel_l2, rel=0.5, abs=1e-2), a.name


def test_greedy_steps_reach_the_child_as_the_golden_picks_them(catalogue_model):
    inputs = RunInputs(PROMPT, None, None, 3)
    here, there = (_diff(catalogue_model("dense"), "rmsnorm-fused", inputs, p) for p in (False, True))
    assert [s["token_ids"] for s in there.steps] == [s["token_ids"] for s in here.steps]
    assert _verdicts(there) == _verdicts(here)
    assert len(there.steps) == 4 and there.first_divergence is None


def test_from_min_decode_steps_on_the_reference_runs_in_its_own_process(catalogue_model, monkeypatch):
    monkeypatch.setattr(diff_run, "MIN_DECODE_STEPS", 3)
    for decode, own in (([5, 6], False), ([5, 6, 7], True)):
        said: list[str] = []
        _diff(catalogue_model("dense"), "rmsnorm-fused", RunInputs(PROMPT, None, decode, None), None, said)
        assert any("in a process of its own" in m for m in said) == own, said


def test_the_childs_user_error_is_the_users(tmp_path):
    remote = RemoteImplementation(parse_side("hf", "ref"), tmp_path / "no-model", torch.bfloat16)
    try:
        with pytest.raises(UserError, match="no-model"):
            remote.ready()
    finally:
        remote.close()


def test_a_child_that_dies_is_said_to_have_ended_not_waited_for(catalogue_model):
    remote = RemoteImplementation(parse_side("hf", "ref"), Path(catalogue_model("dense")), torch.bfloat16)
    remote.proc.kill()
    try:
        with pytest.raises(RuntimeError, match="process ended unexpectedly"):
            remote.ready()
    finally:
        remote.close()
    assert remote.proc.returncode is not None


def test_closing_ends_the_child_at_once(catalogue_model):
    remote = RemoteImplementation(parse_side("hf", "ref"), Path(catalogue_model("dense")), torch.bfloat16)
    remote.ready()
    remote.close()  # it waits for its run, which never comes
    assert remote.proc.returncode is not None
