"""scan-checkpoint's report reads left to right: findings grouped by tensor (a tensor flagged twice is
listed once), worst first with non-finite weights at the top, and no throughput for a read too short
to measure one."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from qwen3dbg.reports.scan_groups import by_tensor
from qwen3dbg.reports.scan_html import scan_html
from qwen3dbg.reports.scan_terminal import print_scan
from rich.console import Console

from qwen3dbg.model.synth import Plants, make_model
from qwen3dbg.scan.checks import Thresholds
from qwen3dbg.scan.scan import scan_checkpoint

TENSORS = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]


@pytest.fixture(scope="module", params=TENSORS)
def scanned(request, tmp_path_factory):
    """Ghost biases of 1e30 (each flagged as huge and as a ghost bias), a huge q_proj, and one NaN tensor,
    planted in turn early, in the middle and late in the file."""
    bad = request.param
    model = make_model(
        tmp_path_factory.mktemp("m"),
        "tiny-dense",
        plants=Plants(ghost_bias=1e30, nonfinite=(bad,), huge=("model.layers.0.self_attn.q_proj.weight",)),
    )
    return bad, scan_checkpoint(model, Thresholds())


def _terminal(result) -> str:
    console = Console(width=100, file=io.StringIO(), color_system=None)
    print_scan(result, console)
    return console.file.getvalue()


def test_a_tensor_with_several_findings_is_listed_once_with_all_of_them(scanned):
    _, result = scanned
    lines = _terminal(result).splitlines()
    bias = "model.layers.0.self_attn.q_proj.bias"
    headings = [i for i, line in enumerate(lines) if line.split()[1:] == [bias]]
    assert len(headings) == 1
    below = " ".join(lines[headings[0] + 1 : headings[0] + 4])
    assert "huge" in below and "ghost-bias" in below


def test_the_non_finite_tensor_comes_first_in_every_view(scanned):
    bad, result = scanned
    assert by_tensor(result)[0][0] == bad
    first_heading = next(line for line in _terminal(result).splitlines() if line.startswith("error"))
    assert first_heading.split() == ["error", bad]
    html = scan_html(result)
    assert html.index(bad) < html.index("model.layers.0.self_attn.q_proj.weight")


def test_groups_are_ordered_by_their_worst_finding(scanned):
    from qwen3dbg.scan.findings import rank

    _, result = scanned
    worst = [max(rank(f.severity) for f in fs) for _, fs in by_tensor(result)]
    assert worst == sorted(worst, reverse=True)


def test_the_html_findings_read_left_to_right(scanned):
    html = scan_html(scanned[1])
    assert '<table class="text"><tr><th>tensor</th><th>severity</th>' in html
    assert "table.text td,table.text th{text-align:left}" in html


def test_a_small_read_shows_no_throughput_and_a_large_one_does(scanned):
    _, result = scanned
    small = _terminal(result).splitlines()[0]
    assert "GB/s" not in small and "MB read" in small
    large = _terminal(replace(result, bytes_read=3_000_000_000, seconds=1.5)).splitlines()[0]
    assert "3 GB read in 1.50 s, 2.00 GB/s" in large
