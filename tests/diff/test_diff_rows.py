"""The row rule: an error confined to some rows of a tap (positions, heads) is judged at its own size, with
each row's noise floor and the multiple comparisons over many rows accounted for."""

from __future__ import annotations

import numpy as np
import torch

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.fused import tap_errors
from qwen3dbg.diff.summary import summary
from qwen3dbg.diff.noise import NORM_FACTOR, REL_FLOOR_ULPS, row_excess
from qwen3dbg.reference.qwen3 import Qwen3Reference, causal_mask
from qwen3dbg.run.registry import IMPLEMENTATIONS

TOKENS = list(range(3, 3 + 160))
WINDOW = 120


def _rows(g, r, c, dtype=torch.bfloat16):
    te = tap_errors(g, r, c, row=g.shape[-1])
    return row_excess(te.rows[4:], te.ref.rel_l2, dtype)


def test_ten_thousand_clean_rows_raise_no_row_and_one_row_five_times_over_the_tap_tolerance_does():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10_000, 64, generator=gen, dtype=torch.float64)
    r = g.to(torch.bfloat16)
    # the candidate rounds as the reference does, with its own errors: wobbled before rounding
    c = (g * (1 + 2**-9 * torch.randn(g.shape, generator=gen, dtype=torch.float64))).to(torch.bfloat16)
    assert float(_rows(g, r, c).max()) < 1
    tol = max(NORM_FACTOR * tap_errors(g, r, c).ref.rel_l2, REL_FLOOR_ULPS * torch.finfo(torch.bfloat16).eps)
    c[4321] = (g[4321] * (1 + 5 * tol * torch.randn(64, generator=gen, dtype=torch.float64))).to(torch.bfloat16)
    excess = _rows(g, r, c)
    assert np.flatnonzero(excess > 1).tolist() == [4321]


class LateWindow(Qwen3Reference):
    """A port that applies a sliding window of `window` keys in layers `first_layer` and up (Qwen3 attends to
    every earlier key), without exposing the attention matrices, as a fused kernel would
    (bench/bench_window.py: issue 27's 0.6B case)."""

    missing_taps = frozenset({"attn_scores", "attn_probs"})
    window, first_layer = WINDOW, 1

    def attend(self, i, q, k_all, v_all, positions, sink):
        self._windowed = i >= self.first_layer
        return super().attend(i, q, k_all, v_all, positions, sink)

    def mask(self, positions, k_len):
        mask = causal_mask(positions, k_len)
        if not self._windowed:
            return mask
        slots = torch.arange(k_len)
        return mask | (slots[None, None, :] <= positions[:, :, None] - self.window)[:, None]


def test_a_window_in_later_layers_is_flagged_by_its_rows_and_named_as_a_window(catalogue_model, monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "late-window", f"{__name__}:LateWindow")
    result = run_diff(
        ref="hf", cand="late-window", model_dir=catalogue_model("dense"), dtype="bfloat16", token_ids=TOKENS
    )
    d = result.first_divergence
    assert d is not None and (d.step, d.tap) == (0, "layers.1.attn_out"), result.verdict
    tap = next(t for t in result.taps if (t.step, t.name) == (0, d.tap))
    rows = tap.extra["rows"]
    whole = max(tap.rel_l2 / tap.tol_rel, tap.max_abs / tap.tol_abs)  # over 160 rows, most of them exact
    assert rows["worst_excess"] > 2 * whole, (rows, whole)
    assert rows["first"]["position"] >= WINDOW, rows  # no row before the window leaves the noise
    assert f"the first at position {rows['first']['position']}" in d.reason
    assert [t.name for t in result.taps if t.layer == 0 and "rows" in t.extra] == []  # layer 0 attends as Qwen3
    assert [(x.signature, x.evidence["window"]) for x in result.diagnosis] == [("sliding_window", WINDOW)], [
        x.message for x in result.diagnosis
    ]
    # the first query the window changes is position WINDOW, replayed there, whatever row first left the noise
    found = result.diagnosis[0]
    assert found.evidence["first_position_changed"] == WINDOW, found.evidence
    assert found.evidence["fit_at_first_changed"] < found.evidence["qwen3_at_first_changed"], found.evidence
    assert f"at position {WINDOW}, the first query it changes, the window's replay reproduces" in found.message


def test_a_clean_pair_over_many_rows_has_no_row_over_its_noise(catalogue_model):
    result = run_diff(
        ref="hf", cand="hf:attn=sdpa", model_dir=catalogue_model("dense"), dtype="bfloat16", token_ids=TOKENS
    )
    assert result.first_divergence is None, result.verdict
    assert [t.name for t in result.taps if "rows" in t.extra] == []


class HotLastQueries(Qwen3Reference):
    """Layer 0's attention scores 25% too large for the queries at positions 60 and later only."""

    def scores(self, q, k, mask):
        s = super().scores(q, k, mask)
        if q.shape[2] > 60:
            s[:, :, 60:] = s[:, :, 60:] * 1.25
        return s


def test_attention_compared_in_row_blocks_is_judged_row_by_row(catalogue_model, monkeypatch):
    """A golden too large to hold whole hands attention out in blocks of query rows: the row rule still sees
    each row, in the tap's own order."""
    monkeypatch.setattr("qwen3dbg.diff.blocks.BLOCK_ELEMENTS", 4 * 4 * 64)  # blocks of 4 query rows
    monkeypatch.setitem(IMPLEMENTATIONS, "hot-last-queries", f"{__name__}:HotLastQueries")
    result = run_diff(
        ref="hf", cand="hot-last-queries", model_dir=catalogue_model("dense"), dtype="bfloat16", token_ids=TOKENS[:64]
    )
    d = result.first_divergence
    assert d is not None and (d.step, d.tap) == (0, "layers.0.attn_scores"), result.verdict
    rows = next(t for t in result.taps if (t.step, t.name) == (0, d.tap)).extra["rows"]
    assert rows["first"] == {"position": 60, "head": 0} and rows["over"] <= 4 * 4, rows  # 4 heads x 4 queries


def test_a_decode_step_names_its_rows_by_their_absolute_position(catalogue_model):
    """A decode step's one query row is the step's position (40 after a 40-token prompt), not token 0: in the
    worst coordinate, the summary, and a row of the cache over its noise (a cache slot is its position)."""
    prompt = TOKENS[:40]
    model = catalogue_model("dense")
    # decode attention over 40 keys in partitions of 16 goes wrong at step 1's query, position 40
    result = run_diff(
        cand="split-kv-unscaled:partition=16", model_dir=model, dtype="bfloat16", token_ids=prompt, decode_ids=[5, 6]
    )
    d = result.first_divergence
    assert d is not None and (d.step, d.tap) == (1, "layers.0.attn_out"), result.verdict
    assert d.worst["token"] == 0 and d.worst["position"] == len(prompt), d.worst
    line = dict(summary(result))["first divergence"]
    assert f"position {len(prompt)}" in line and "token" not in line, line
    # the decode step rewrites the slot before its own (position 39): the cache's rows name that slot
    result = run_diff(
        cand="kv-cache-off-by-one", model_dir=model, dtype="bfloat16", token_ids=prompt, decode_ids=[5, 6]
    )
    d = result.first_divergence
    assert d is not None and (d.step, d.tap) == (1, "layers.0.k_cache"), result.verdict
    assert f"the first at position {len(prompt) - 1}, head 0" in d.reason, d.reason
