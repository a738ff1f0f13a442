"""The terminal summary reads in ten seconds at 80 columns: every column labelled, no name cut, the
statistic behind an excess in the row that shows it, and the sides and origin said in sentences."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from qwen3dbg.reports.terminal import layer_table, render
from rich.console import Console

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.summary import summary
from qwen3dbg.tapstore.schema import OPS_BY_NAME


@pytest.fixture(scope="module")
def moe_bug(catalogue_model):
    return run_diff("hf", "rope-theta-1e4", model_dir=catalogue_model("moe"), decode_steps=2)


def _text(renderable_or_result, width=80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    if hasattr(renderable_or_result, "taps"):
        render(renderable_or_result, console)
    else:
        console.print(renderable_or_result)
    return console.file.getvalue()


def test_every_column_is_labelled(moe_bug):
    assert all(c.header.strip() for c in layer_table(moe_bug).columns)


@pytest.mark.parametrize("op", sorted(OPS_BY_NAME))
def test_every_op_name_and_large_numbers_fit_80_columns(moe_bug, op):
    """Each op in turn as every layer's worst tap, with numbers as long as they get."""
    worst = [
        replace(
            t,
            op=op,
            excess=123456.0 + i,
            rel_l2=1.2345e-05,
            ref_rel_l2=6.789e-07,
            max_abs=1.5e30,
            ref_max_abs=2.5e-30,
            step=255,
            mismatch=0.999,
        )
        for i, t in enumerate(moe_bug.taps)
    ]
    text = _text(replace(moe_bug, taps=worst))
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert sum(f" {op} " in line for line in text.splitlines()) >= moe_bug.config["num_hidden_layers"]


def test_an_expert_choice_excess_shows_the_id_mismatch_in_its_row(moe_bug):
    rows = [line for line in _text(layer_table(moe_bug)).splitlines() if "moe.topk_ids" in line]
    assert rows and all("ids differ:" in line and "% of tokens" in line for line in rows)


def test_a_value_row_shows_the_statistic_that_sets_its_excess_beside_the_references(moe_bug):
    first_layer = next(line for line in _text(layer_table(moe_bug)).splitlines() if line.split()[:1] == ["0"])
    assert "rel. L2" in first_layer and " vs " in first_layer and "first" in first_layer


def test_first_marks_the_row_of_the_first_divergence_not_its_layers_worst_op(moe_bug):
    first = moe_bug.first_divergence
    worst = max((t for t in moe_bug.taps if t.layer == first.layer), key=lambda t: t.excess)
    assert (worst.step, worst.name) != (first.step, first.tap)  # else this test shows nothing
    (marked,) = [line.split() for line in _text(layer_table(moe_bug), width=200).splitlines() if "first" in line]
    assert marked[:3] == [str(first.layer), first.op, str(first.step)]


def test_sides_and_origin_read_as_sentences(moe_bug):
    said = dict(summary(moe_bug))
    assert said["sides"].startswith(
        "Candidate rope-theta-1e4 against reference hf in bfloat16, on 16 prompt tokens and 2 decode steps."
    )
    assert said["origin"].startswith("layer 0 introduced the error: run on the reference's own input")


def test_rows_follow_the_model_from_embed_through_the_layers_to_the_head(moe_bug):
    """However many layers (ten sorts before two as text), the embedding row comes first and the head last."""
    n = moe_bug.config["num_hidden_layers"]
    many = [replace(t, layer=t.layer + 9 * (t.layer % 2)) if t.layer is not None else t for t in moe_bug.taps]
    for result, layers in (
        (moe_bug, range(n)),
        (replace(moe_bug, taps=many), sorted({t.layer for t in many} - {None})),
    ):
        lines = _text(layer_table(result), width=200).splitlines()
        body = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"]) + 1 :]
        keys = [words[0] for words in map(str.split, body) if words]
        # a layer's first divergence may take a second row of its own, right under the first
        assert [k for i, k in enumerate(keys) if k not in keys[:i]] == ["embed", *map(str, layers), "head"]
