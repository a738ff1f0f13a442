"""The streaming diff's mechanics at length: the one-pass golden, block-wise comparison, cache slots, and
memory that grows linearly in tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen3dbg.reference.qwen3 import Qwen3Reference

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.blocks import RowBlocks, blocked_count_over, blocked_errors
from qwen3dbg.diff.fused import count_over, tap_errors
from qwen3dbg.diff.golden import LongGolden
from qwen3dbg.diff.golden import Keeper, golden_forced
from qwen3dbg.diff.streams import CacheSlots, Schedule, ThreadSide
from qwen3dbg.diff.summary import decode_story
from qwen3dbg.run.capture import capture, forced_steps, run_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.tapstore.validate import validate_store

PROMPT = [(13 * i + 5) % 512 for i in range(40)]
DECODE = [7, 300, 42, 9]


def _value(v):
    if isinstance(v, RowBlocks):
        return v.whole()
    return v.full if isinstance(v, CacheSlots) else v


def test_the_one_pass_golden_replays_every_decode_step_of_a_stepping_float64_run(catalogue_model):
    """Golden rows of one forward over prompt + decode ids equal the taps of real fp64 decode steps (to fp64's
    own rounding-order noise), cache and attention rows included; the pass itself keeps no layer's keys and
    values (the kept rows are the decode steps' cache)."""
    model = catalogue_model("dense")
    steps = forced_steps(PROMPT, DECODE)
    stepped = run_steps(Qwen3Reference(model, "float64"), steps)
    schedule = Schedule(steps, len(steps))
    keeper = Keeper(torch.float64, in_memory=1 << 16)  # most rows go to the file-backed pages
    golden = LongGolden(model, one_pass=True)
    side = ThreadSide("golden", golden_forced(golden, steps, keeper), lambda n: True, True, schedule)
    try:
        for info, want in zip(steps, stepped):
            for name, expected in want.items():
                got = _value(side.take(info.step, name))
                assert got is not None, (info.step, name)
                if not expected.is_floating_point():
                    assert torch.equal(got, expected), (info.step, name)
                    continue
                finite = torch.isfinite(expected)
                assert torch.equal(finite, torch.isfinite(got)), (info.step, name)
                err = (got[finite] - expected[finite]).abs().max()
                assert err <= 1e-12 * max(1.0, float(expected[finite].abs().max())), (info.step, name, float(err))
            side.end_step(info.step)
    finally:
        side.close()
    assert keeper.spilled > 0
    assert golden.cache == [None] * golden.config.num_hidden_layers


@pytest.mark.parametrize("rows", [1, 3, 7, 64])
def test_block_by_block_statistics_equal_the_whole_tap(rows, monkeypatch):
    """Folding per-block statistics gives the whole tap's: norms, maxima, the worst element's index, counts."""
    monkeypatch.setattr("qwen3dbg.diff.blocks.BLOCK_ELEMENTS", rows * 4 * 50)
    gen = torch.Generator().manual_seed(rows)
    g = torch.randn(1, 4, 64, 50, generator=gen, dtype=torch.float64)
    r = (g + 1e-3 * torch.randn(g.shape, generator=gen, dtype=torch.float64)).to(torch.bfloat16)
    c = (g + 3e-3 * torch.randn(g.shape, generator=gen, dtype=torch.float64)).to(torch.bfloat16)
    c[0, 2, 40, 7] = float("nan")
    blocks = RowBlocks(tuple(g.shape), 2, lambda a, b: g[:, :, a:b])
    whole, folded = tap_errors(g, r, c), blocked_errors(blocks, r, c, False, None)
    assert folded.count == whole.count and folded.nonfinite == whole.nonfinite
    assert folded.cand.argmax == whole.cand.argmax and folded.cand.max_abs == whole.cand.max_abs
    for field in ("gold_norm", "diff_norm", "dot"):
        assert getattr(folded, field) == pytest.approx(getattr(whole, field), rel=1e-12)
    assert folded.cand.rel_l2 == pytest.approx(whole.cand.rel_l2, rel=1e-12)
    assert folded.ref.max_abs == whole.ref.max_abs
    limit = whole.cand.max_abs / 3
    assert blocked_count_over(blocks, r, c, limit, False, None) == count_over(g, r, c, limit)
    # the per-row sums of the row rule, each block's rows put back in the whole tap's order
    row = g.shape[-1]
    assert np.allclose(blocked_errors(blocks, r, c, False, None, row=row).rows, tap_errors(g, r, c, row=row).rows)


def test_attention_of_a_long_prompt_is_compared_in_blocks_and_still_localizes_a_mask_bug(catalogue_model, monkeypatch):
    """With blocks of a few query rows, a causal-mask bug is still found at layer 0's attn_scores."""
    monkeypatch.setattr("qwen3dbg.diff.blocks.BLOCK_ELEMENTS", 4 * 4 * 64)
    result = run_diff(
        "hf",
        "no-causal-mask",
        model_dir=catalogue_model("dense"),
        dtype="float32",
        token_ids=PROMPT[:64],
        decode_ids=DECODE[:1],
    )
    d = result.first_divergence
    assert (d.step, d.tap) == (0, "layers.0.attn_scores") and "mask pattern" in d.reason


class RingCache(Qwen3Reference):
    """A cache of `slots` entries that wraps: the token at position p is written to slot p % slots, so from
    position `slots` on it overwrites the oldest entries (a sliding-window ring used without its window)."""

    name = "ring-cache"

    def __init__(self, model_dir, dtype="float32", *, slots: int = 44):
        super().__init__(model_dir, dtype)
        self.slots = slots

    def update_cache(self, layer, k, v):
        past = self.cache[layer]
        if past is None:
            return super().update_cache(layer, k, v)
        length = past[0].shape[2]
        if length < self.slots:
            return super().update_cache(layer, k, v)
        k_all, v_all = past[0].clone(), past[1].clone()
        slot = length % self.slots
        k_all[:, :, slot : slot + 1], v_all[:, :, slot : slot + 1] = k, v
        k_all, v_all = torch.cat((k_all, k), 2), torch.cat((v_all, v), 2)  # shown at the right length
        self.cache[layer] = (k_all, v_all)
        return k_all, v_all


def test_a_cache_that_overwrites_an_old_slot_is_caught_at_the_step_and_slot_where_it_happens(
    catalogue_model, monkeypatch
):
    """44 slots, prompt 40: decode steps 1-4 fill slots 40-43, step 5 writes position 44 into slot 0."""
    from qwen3dbg.run import registry

    monkeypatch.setitem(registry.IMPLEMENTATIONS, "ring-cache", f"{__name__}:RingCache")
    model = catalogue_model("dense")
    result = run_diff(
        "hf", "ring-cache", model_dir=model, dtype="float32", token_ids=PROMPT, decode_ids=[3, 4, 5, 6, 7, 8]
    )
    d = result.first_divergence
    wraps_at = 44 - len(PROMPT) + 1  # the step whose token sits at position 44
    assert (d.step, d.tap) == (wraps_at, "layers.0.k_cache")
    assert "changed cache slot(s) [0]" in d.reason
    # error against step: clean until the wrap, over from there on, and said so in one sentence
    rows = {r["step"]: r for r in result.step_summary}
    assert all(rows[s]["divergent"] == 0 for s in range(wraps_at)) and rows[wraps_at]["divergent"] > 0
    assert f"through step {wraps_at - 1}; from step {wraps_at} on" in decode_story(result)


def test_the_json_of_a_long_decode_lists_the_taps_of_the_steps_that_matter_and_summarises_the_rest(catalogue_model):
    result = run_diff(
        "hf",
        "kv-cache-off-by-one",
        model_dir=catalogue_model("dense"),
        dtype="float32",
        token_ids=PROMPT[:6],
        decode_ids=list(range(1, 31)),
    )
    doc = result.to_dict()
    assert [r["step"] for r in doc["step_summary"]] == list(range(31))
    assert {t["step"] for t in doc["taps"]} == {0, *range(1, 17)}
    assert len(doc["taps"]) < len(result.taps)


def test_a_capture_stores_large_decode_caches_as_slots_that_validate_and_diff_clean(
    catalogue_model, tmp_path, monkeypatch
):
    monkeypatch.setattr("qwen3dbg.tapstore.store.FULL_CACHE_BYTES", 0)  # every cache counts as large
    model = catalogue_model("dense")
    path = capture(load_candidate("scratch", model, "bfloat16"), forced_steps(PROMPT, DECODE), tmp_path / "s")
    store = TapStore.open(path)
    assert store.steps[0].cache_positions is None
    assert [s.cache_positions for s in store.steps[1:]] == [[len(PROMPT) + i] for i in range(len(DECODE))]
    assert store.get(2, "layers.1.v_cache").shape[2] == 1
    assert validate_store(path) == []
    result = run_diff("hf", f"store:{path}", model_dir=model)
    assert result.first_divergence is None and not result.not_compared


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("cache_positions", [999], "not cache slots"),
        ("cache_positions", [3, 3], "repeats"),
        ("cache_positions", [5], "neither the step's own positions"),
        ("attention_positions", [0], "not query rows"),
        ("cache_positions", "40", "non-empty list"),
    ],
)
def test_a_store_declaring_impossible_slots_or_rows_is_refused(catalogue_model, tmp_path, field, value, words):
    model = catalogue_model("dense")
    path = capture(load_candidate("scratch", model, "float32"), forced_steps(PROMPT[:6], [7, 9]), tmp_path / "s")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["steps"][2][field] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    problems = [str(p) for p in validate_store(path)]
    assert any(words in p for p in problems), problems


def test_attention_rows_of_a_subset_of_queries_are_compared_at_those_rows(catalogue_model, tmp_path):
    """A store holding attention for query rows 2 and 5 only: clean as written; a change in row 5 is found."""
    from safetensors.torch import load_file, save_file

    model = catalogue_model("dense")

    def store(out: Path, edit) -> str:
        path = capture(load_candidate("scratch", model, "float32"), forced_steps(PROMPT[:8], []), out)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["steps"][0]["attention_positions"] = [2, 5]
        (path / "manifest.json").write_text(json.dumps(manifest))
        taps = load_file(path / "step_0000.safetensors")
        for name, t in taps.items():
            if name.endswith(("attn_scores", "attn_probs")):
                taps[name] = edit(name, t[:, :, [2, 5]].contiguous())
        save_file(taps, path / "step_0000.safetensors")
        assert validate_store(path) == []
        return f"store:{path}"

    assert run_diff("hf", store(tmp_path / "clean", lambda n, t: t), model_dir=model).first_divergence is None

    def broken(name, t):
        if name == "layers.1.attn_probs":
            t[0, 0, 1, 0] += 0.25
        return t

    d = run_diff("hf", store(tmp_path / "bad", broken), model_dir=model).first_divergence
    assert d.tap == "layers.1.attn_probs" and d.worst["token"] == 5  # the step's token, not the row's index


def test_logits_of_some_rows_are_compared_at_those_rows(catalogue_model, tmp_path):
    """A store holding the prefill's logits at its last position only (as a serving engine samples): valid,
    clean as written; a change in that row is found there."""
    from safetensors.torch import load_file, save_file

    model = catalogue_model("dense")

    def store(out: Path, shift: float) -> str:
        path = capture(load_candidate("scratch", model, "float32"), forced_steps(PROMPT[:8], [9]), out)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["steps"][0]["logits_positions"] = [7]
        (path / "manifest.json").write_text(json.dumps(manifest))
        taps = load_file(path / "step_0000.safetensors")
        taps["logits"] = taps["logits"][:, 7:].contiguous()
        taps["logits"][0, 0, 3] += shift
        save_file(taps, path / "step_0000.safetensors")
        assert validate_store(path) == []
        return f"store:{path}"

    clean = run_diff("hf", store(tmp_path / "clean", 0.0), model_dir=model)
    assert clean.first_divergence is None
    assert next(t for t in clean.taps if t.step == 0 and t.name == "logits").extra["positions"] == [7]
    d = run_diff("hf", store(tmp_path / "bad", 0.5), model_dir=model).first_divergence
    assert (d.step, d.tap, d.worst["token"]) == (0, "logits", 7)


def _peak(args: list[str]) -> dict:
    code = (
        "import json, sys, threading, time\n"
        "from pathlib import Path\n"
        "peak = [0]\n"
        "def anon():\n"
        "    return int(next(l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('RssAnon:')).split()[1]) * 1024\n"
        "def watch():\n"
        "    while True:\n"
        "        peak[0] = max(peak[0], anon()); time.sleep(0.005)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "from qwen3dbg.diff import run_diff\n"
        "base = anon()\n"
        "model, ref, cand, n = sys.argv[1:5]\n"
        "ids = [(13 * i + 5) % 512 for i in range(int(n))]\n"
        "wchar = lambda: int(next(l for l in Path('/proc/self/io').read_text().splitlines()"
        " if l.startswith('wchar:')).split()[1])\n"
        "w0 = wchar()\n"
        "run_diff(ref, cand, model_dir=model, dtype='bfloat16', token_ids=ids, decode_ids=[7, 9])\n"
        "print(json.dumps({'added': peak[0] - base, 'written': wchar() - w0}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_and_bytes_written_grow_linearly_from_1024_to_2048_tokens(catalogue_model):
    """Both sides without attention matrices (sdpa): what the diff adds to its sides grows <= 2.2x when the
    prompt doubles, and it writes nothing (the bound of the real-lengths issue, on a tiny model)."""
    model = str(catalogue_model("dense"))
    small, large = (_peak([model, "hf:attn=sdpa", "hf:attn=sdpa", str(n)]) for n in (1024, 2048))
    assert large["added"] <= 2.2 * small["added"], (small, large)
    assert small["written"] < 1 << 20 and large["written"] < 1 << 20, (small, large)
