"""The HTML report opens in a real browser (headless Debian chromium): it renders its plots, logs no
console error, needs no network, and escapes every string that came from a store or the user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace

import pytest
from qwen3dbg.reports.diff_html import NEAREST, render_html, table, tap_rows

from qwen3dbg.diff import run_diff
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def report(catalogue_model, tmp_path_factory):
    """A report of a bug with decode steps, read from a store whose directory name is markup."""
    model = catalogue_model("moe")
    root = tmp_path_factory.mktemp("html")
    store = capture(
        load_candidate("rope-theta-1e4", model, "bfloat16"),
        forced_steps([9, 41, 7, 300, 12, 5], [77, 150]),
        root / EVIL,
    )
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "notes": [f"a caveat with markup {EVIL}"]}))
    result = run_diff("hf", f"store:{store}", model_dir=model)
    path = root / "report.html"
    path.write_text(render_html(result), encoding="utf-8")
    return result, path


def test_every_string_from_a_store_is_escaped(report):
    result, path = report
    text = path.read_text()
    assert EVIL not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "a caveat with markup &lt;img" in text  # the store's notes are shown, escaped


def test_report_is_self_contained_with_verdict_and_diagnosis_before_the_plots(report):
    result, path = report
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text
    assert text.count("<script>") == 1 and EVIL not in text.split("<script>")[1]  # our inline code, no data
    verdict, diagnosis, first_plot, logits, taps = (
        text.index("verdict bad"),
        text.index(result.diagnosis[0].signature),
        text.index("data:image/png;base64,"),
        text.index("<h2>Logits"),
        text.index("<h2>Taps"),
    )
    assert verdict < diagnosis < first_plot < logits < taps
    assert text.count("data:image/png;base64,") == 3  # error vs layer, heatmap, per step (decode)


def test_a_prefill_only_report_leaves_out_the_per_step_view(catalogue_model):
    result = run_diff("hf", "scratch", model_dir=catalogue_model("dense"), dtype="float32", token_ids=[4, 5, 6])
    assert render_html(result).count("data:image/png;base64,") == 2


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: CI must install Debian's chromium to test the HTML report")
        pytest.skip("chromium is not installed (apt-get install chromium); the report is not opened in a browser")
    return exe


def test_report_renders_in_headless_chromium_with_its_plots_and_no_console_error(report, tmp_path):
    import matplotlib.image as mpimg

    _, path = report
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1300,2600",
    ]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 3 and "qwen3dbg diff" in dom.stdout
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True
    )
    pixels = mpimg.imread(shot)[..., :3]
    colourful = (pixels.max(-1) - pixels.min(-1)) > 0.25  # plot lines and the heatmap, not black text on white
    assert colourful.mean() > 0.01


# ---- the tap table: what matters first, marked, folded, sortable ---------------------------------------


def _body_rows(html: str) -> list[str]:
    return re.findall(r'<tr class="([a-z ]+)">', html)


def test_divergent_taps_come_first_marked_and_the_first_divergence_leads(report):
    result, _ = report
    rows = tap_rows(result)
    assert rows[0].kind == "first" and rows[0].label == result.first_divergence.tap
    order = [r.kind for r in rows]
    rank = {"first": 0, "divergent": 1, "near": 2, "clean": 3}
    assert order == sorted(order, key=rank.get)
    divergent = {t.name for t in result.taps if t.divergent}
    assert {r.label for r in rows if r.kind in ("first", "divergent")} == divergent  # each once, over all steps
    classes = _body_rows(table(result))
    assert classes[0] == "first divergent" and classes.count("divergent") == len(divergent) - 1


def test_clean_layers_fold_into_one_row_each_after_the_taps_nearest_their_limit(catalogue_model):
    result = run_diff("hf", "scratch", model_dir=catalogue_model("dense"), decode_steps=2)
    rows = tap_rows(result)
    near = [r for r in rows if r.kind == "near"]
    folded = [r for r in rows if r.kind == "clean"]
    assert len(near) == NEAREST
    assert [r.worst.excess for r in near] == sorted((r.worst.excess for r in near), reverse=True)
    assert len(folded) == result.config["num_hidden_layers"] + 1  # each layer, and the ops outside the layers
    assert min(r.worst.excess for r in near) >= max(r.worst.excess for r in folded)
    assert sum(r.collapsed for r in folded) + len(near) == len({t.name for t in result.taps if t.status == "ok"})


def _long(result, steps: int):
    """`result` stretched to `steps` decode steps by repeating its last step: a long run's shape."""
    last = [t for t in result.taps if t.step == len(result.steps) - 1]
    taps = result.taps + [replace(t, step=s) for s in range(len(result.steps), steps + 1) for t in last]
    return replace(result, taps=taps, steps=result.steps + [result.steps[-1]] * (steps + 1 - len(result.steps)))


def test_the_table_grows_with_interesting_rows_not_with_steps_times_taps(report):
    result, _ = report
    short, long = table(result), table(_long(result, 256))
    assert len(_body_rows(long)) == len(_body_rows(short)) < len(result.taps) / 2
    assert len(long) < 1.2 * len(short)
    assert "257 of 257" in long or "none of 257" in long


def test_logit_metrics_say_what_a_clean_run_of_the_dtype_looks_like(report):
    result, path = report
    text = path.read_text()
    section = text[text.index("<h2>Logits") : text.index("<h2>Taps")]
    assert "What a clean run of bfloat16 looks like is the reference's column" in section
    ref = next(t for t in result.taps if t.op == "logits").extra["reference"]
    assert f"{ref['top5_overlap']:.3g}" in section


def test_the_star_sits_on_its_own_ops_line_and_legends_stay_off_the_data(report, monkeypatch):
    import qwen3dbg.reports.diff_html as diff_html

    result, _ = report
    figures = []
    monkeypatch.setattr(diff_html, "figure_png", lambda fig: figures.append(fig) or "")
    diff_html.error_plot(result)
    fig, d = figures[0], result.first_divergence
    fig.canvas.draw()
    starred = [ax for ax in fig.axes if any(line.get_marker() == "*" for line in ax.lines)]
    assert len(starred) == 1
    ax = starred[0]
    star = next(line for line in ax.lines if line.get_marker() == "*")
    own = next(line for line in ax.lines if line.get_label() == d.op)
    at = list(own.get_xdata()).index(d.layer)
    assert star.get_ydata()[0] == own.get_ydata()[at]
    for ax in fig.axes:
        if ax.get_legend() is not None:
            assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_report_sorts_filters_and_marks_the_divergent_row_in_headless_chromium(report, tmp_path):
    """Clicks the excess header twice (descending), reads the order and the first row's colour, then
    filters by a tap name: through the report's own script, in a real browser."""
    _, path = report
    probe = """<script>
    var th = document.querySelector('#taps th[data-col="excess"]'); th.click(); th.click();
    var rows = document.querySelectorAll('#taps tbody tr');
    document.body.setAttribute('data-order', Array.prototype.map.call(rows, function (r) {
      return r.cells[4].getAttribute('data-v'); }).join(' '));
    var marked = document.querySelector('#taps tr.first');
    document.body.setAttribute('data-first-bg', getComputedStyle(marked.cells[0]).backgroundColor);
    var plain = document.querySelector('#taps tr.near') || document.querySelector('#taps tr.clean');
    document.body.setAttribute('data-plain-bg', plain ? getComputedStyle(plain.cells[0]).backgroundColor : '');
    var box = document.getElementById('tap-filter'); box.value = 'k_rope'; box.dispatchEvent(new Event('input'));
    document.body.setAttribute('data-shown', Array.prototype.filter.call(rows, function (r) {
      return !r.hidden; }).map(function (r) { return r.cells[1].textContent; }).join(' '));
    </script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text().replace("</body>", probe), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    )
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attr = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    order = [float(x) for x in attr["order"].split()]
    assert order == sorted(order, reverse=True) and len(order) > 1
    assert attr["first-bg"] not in ("", "rgba(0, 0, 0, 0)", attr["plain-bg"])
    shown = attr["shown"].split()
    assert shown and all("k_rope" in name for name in shown)
