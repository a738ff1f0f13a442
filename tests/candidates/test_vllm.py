"""vLLM's own Qwen3 and Qwen3-MoE through its real engine (`--cand vllm`, candidates/vllm/).

Marked `vllm`: the main suite deselects them (pyproject's addopts); .ci/run builds the venv of
.ci/install_vllm.sh and runs `pytest -m vllm` in it, where they may not skip. Bugs planted inside vLLM
(tests/candidates/vllm_patches/) run in a fresh interpreter each: a patch changes vLLM's classes for the process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3dbg.diff import run_diff

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None and os.environ.get("CI") != "true",
        reason="vLLM is not installed here: run .ci/install_vllm.sh and pytest -m vllm in its venv",
    ),
]

PATCHES = Path(__file__).parent / "vllm_patches"
PROMPT = list(range(3, 83))  # 80 tokens: three 32-token blocks, the last partly filled
DECODE = [5, 6, 7]


def diff(model, cand: str, dtype: str = "bfloat16", ref: str = "hf"):
    return run_diff(ref, cand, model_dir=model, dtype=dtype, token_ids=PROMPT, decode_ids=DECODE)


def taps(result, step: int) -> dict:
    return {t.name: t for t in result.taps if t.step == step}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_alone_is_clean_and_compares_every_tap_vllm_computes(models, preset, dtype):
    """vLLM's kernels sit within HF's noise floor at every tap; every schema tap but the attention matrices
    is compared, and logits at the one row vLLM samples (the prompt's last position)."""
    r = diff(models(preset), "vllm", dtype)
    assert r.first_divergence is None, r.first_divergence
    not_compared = {t.op for t in r.taps if t.status == "not_compared"}
    assert not_compared == {"attn_scores", "attn_probs"}
    prefill = taps(r, 0)
    assert prefill["logits"].extra["positions"] == [len(PROMPT) - 1]
    assert "positions" not in prefill["layers.2.resid_out"].extra  # every row of the prompt compared
    if preset == "tiny-moe":
        assert prefill["layers.0.moe.topk_ids"].status == "ok"
    cand = next(s for s in r.sides if s.role == "cand")
    assert any("eager" in n for n in cand.notes)


def test_speed_on_puts_vllms_compiled_tokens_per_s_beside_the_captured_runs_in_every_report(models):
    """The captured (eager) decode's tokens/s is always in the notes; speed=on adds vLLM's own on the same
    forced ids with capture off, eager and compiled, to the summary and the JSON alike."""
    from qwen3dbg.diff.summary import summary
    from qwen3dbg.reports.diff_json import render_json

    plain = next(s for s in diff(models("tiny-dense"), "vllm").sides if s.role == "cand")
    assert [n for n in plain.notes if "tokens/s" in n] == [
        next(n for n in plain.notes if n.startswith("vLLM's 3 decode steps ran at") and "capture on" in n)
    ]
    # 24 timed tokens: on a tiny model 2 tokens' time was within the noise of a loaded machine
    r = run_diff("hf", "vllm:speed=on", model_dir=models("tiny-dense"), token_ids=PROMPT, decode_ids=list(range(5, 29)))
    assert r.first_divergence is None
    notes = [text for label, text in summary(r) if label == "note" and "tokens/s" in text]
    alone = next(n for n in notes if "capture off" in n)
    eager, compiled = (float(alone.split(" tokens/s " + mode)[0].split()[-1]) for mode in ("eager", "compiled"))
    assert eager > 0 and compiled > 0
    cand = next(s for s in json.loads(render_json(r))["sides"] if s["role"] == "cand")
    assert any(n in notes[-1] for n in cand["notes"]) and len([n for n in cand["notes"] if "tokens/s" in n]) == 2


def test_a_thread_count_of_its_own_runs_in_the_diffs_thread(models):
    """`threads=1` on a machine of more cores: the diff runs vLLM in a thread of its own, whose count vLLM's
    attention reads when it plans a forward and again when it runs it; both must be the option's."""
    before = torch.get_num_threads()
    try:
        for threads in {1, before + 1}:
            assert diff(models("tiny-dense"), f"vllm:threads={threads}").first_divergence is None
    finally:
        torch.set_num_threads(before)


def test_a_short_max_model_len_still_holds_the_run(models):
    """A max_model_len that is not a whole number of blocks (here 1.6 of them) leaves vLLM's cache room for it."""
    assert diff(models("tiny-dense"), "vllm:max_model_len=200").first_divergence is None


def test_as_the_reference_beside_a_batched_vllm(models):
    """Two engines in one process, run side by side (one at a time through vLLM's global forward context)."""
    assert diff(models("tiny-dense"), "vllm:batch=3", ref="vllm").first_divergence is None


@pytest.mark.parametrize("options", ["batch=3", "chunk=24", "batch=3,chunk=16"])
def test_batched_and_chunked_runs_are_clean(models, options):
    assert diff(models("tiny-moe"), f"vllm:{options}").first_divergence is None


def test_a_cached_prefix_is_said_and_the_rest_compared(models):
    """prefix=64: the prompt's first two blocks come from the cache; the prefill's token taps are compared
    at positions 64.. and its cache at every position."""
    r = diff(models("tiny-dense"), "vllm:prefix=64,block_size=32")
    assert r.first_divergence is None
    prefill = taps(r, 0)
    assert prefill["layers.1.q_rope"].extra["positions"].startswith("64..79")
    assert prefill["layers.1.k_cache"].numel == 2 * 80 * 32
    cand = next(s for s in r.sides if s.role == "cand")
    assert any("positions 0..63" in n and "prefix cache" in n for n in cand.notes)


def test_the_cache_tap_is_the_keys_vllm_stored(models):
    """The paged cache read back through the block table holds the step's k_rope and v_proj bit for bit."""
    from qwen3dbg.run.candidate import DictSink
    from qwen3dbg.run.registry import load_candidate

    cand = load_candidate("vllm", models("tiny-dense"), "bfloat16", block_size=32)
    cand.reset()
    sink = DictSink({f"layers.1.{op}" for op in ("k_cache", "v_cache", "k_rope", "v_proj")})
    cand.step(torch.tensor([PROMPT]), torch.tensor([list(range(len(PROMPT)))]), sink)
    k, v = sink.taps["layers.1.k_cache"], sink.taps["layers.1.v_cache"]
    assert torch.equal(k, sink.taps["layers.1.k_rope"].transpose(1, 2))
    assert torch.equal(v, sink.taps["layers.1.v_proj"].view(1, len(PROMPT), 2, 32).transpose(1, 2))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_decode_steps_cache_slot_read_alone_is_the_slot_of_the_whole_cache(models, monkeypatch, kv_cache_dtype):
    """Past FULL_CACHE_BYTES a decode step hands on only the slot it wrote, read from its block alone: it is
    what the whole cache, read back at the next step, holds at that position (keys and values, any dtype)."""
    from qwen3dbg.diff.streams import CacheSlots
    from qwen3dbg.run.registry import load_candidate

    class DictSink(dict):  # as handed on: a slot is no tensor
        def __init__(self, names):
            self.names = names

        def wants(self, name):
            return name in self.names

        def __call__(self, name, t):
            self[name] = t

    cand = load_candidate("vllm", models("tiny-dense"), "bfloat16", block_size=32, kv_cache_dtype=kv_cache_dtype)
    cand.reset()
    names = {"layers.1.k_cache", "layers.1.v_cache"}
    n = len(PROMPT)
    cand.step(torch.tensor([PROMPT]), torch.tensor([list(range(n))]), DictSink(set()))
    monkeypatch.setattr("qwen3dbg.candidates.vllm.recorder.FULL_CACHE_BYTES", 0)  # every cache counts as large
    alone = DictSink(names)
    cand.step(torch.tensor([[DECODE[0]]]), torch.tensor([[n]]), alone)
    monkeypatch.undo()
    whole = DictSink(names)
    cand.step(torch.tensor([[DECODE[1]]]), torch.tensor([[n + 1]]), whole)
    for name in names:
        slot = alone[name]
        assert isinstance(slot, CacheSlots) and slot.positions == [n]
        assert torch.equal(slot.values, whole[name][:, :, n : n + 1])


@pytest.mark.parametrize("kv_cache_dtype,fmt", [("fp8", "float8_e4m3"), ("fp8_e5m2", "float8_e5m2")])
def test_an_fp8_cache_diverges_at_the_cache_with_its_cause(models, kv_cache_dtype, fmt):
    r = diff(models("tiny-dense"), f"vllm:kv_cache_dtype={kv_cache_dtype}")
    d = r.first_divergence
    assert (d.step, d.tap) == (0, "layers.0.k_cache")
    found = r.diagnosis[0]
    assert found.signature == "cache_lowp" and found.evidence["format"] == fmt
    assert found.evidence["rounding"] == "toward_zero"  # vLLM's CPU cache writer drops the low bits


def test_a_config_vllm_loads_differently_through_hf_overrides(models):
    """vLLM told norm_topk_prob=false for a model that says true: the top-k weights are not renormalised."""
    r = diff(models("tiny-moe"), "vllm:hf_overrides=norm_topk_prob:false")
    d = r.first_divergence
    assert (d.step, d.tap) == (0, "layers.0.moe.topk_weights")
    assert r.diagnosis[0].signature == "moe_topk_not_normalised"


def _patched(model, patch: str, *options: str) -> list[dict | None]:
    """`vllm:OPTIONS,patch=PATCH` diffed for each of `options`, in one fresh interpreter: per run, None when
    clean, else where it diverged and the diagnosis."""
    cands = ["vllm:" + ",".join(filter(None, [o, f"patch={PATCHES / patch}"])) for o in options]
    code = f"""
import json
from qwen3dbg.diff import run_diff
out = []
for cand in {cands!r}:
    r = run_diff("hf", cand, model_dir={str(model)!r}, dtype="bfloat16", token_ids={PROMPT!r}, decode_ids={DECODE!r})
    d = r.first_divergence
    found = [x.signature for x in r.diagnosis]
    out.append(d and {{"at": [d.step, d.layer, d.tap], "worst": d.worst, "diagnosis": found}})
print("RESULT " + json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize(
    "patch,preset,at,signature",
    [
        ("rope_theta_1e4.py", "tiny-dense", "layers.0.q_rope", "rope_theta"),
        ("gqa_modulo.py", "tiny-dense", "layers.0.attn_out", "gqa_modulo"),
        ("moe_no_renorm.py", "tiny-moe", "layers.0.moe.topk_weights", "moe_topk_not_normalised"),
    ],
)
def test_a_bug_planted_in_vllm_is_found_at_its_op(models, patch, preset, at, signature):
    (found,) = _patched(models(preset), patch, "")
    assert found["at"] == [0, 0, at] and found["diagnosis"][0] == signature


def test_a_batch_only_bug_shows_in_a_batch_only(models):
    """Positions taken from the flat token axis: right alone, wrong for a sequence that is not first."""
    alone, batched = _patched(models("tiny-dense"), "batch_positions.py", "", "batch=3")
    assert alone is None
    assert batched["at"] == [0, 0, "layers.0.q_rope"]


def test_a_chunk_boundary_bug_is_found_at_the_chunk_start(models):
    """The first row of a later prefill chunk one position early: clean in one forward; with chunk=48 the
    divergence is the prefill's q_rope at token 48, where the second chunk starts."""
    whole, chunked = _patched(models("tiny-dense"), "chunk_start.py", "", "chunk=48")
    assert whole is None
    assert chunked["at"] == [0, 0, "layers.0.q_rope"] and chunked["worst"]["token"] == 48
