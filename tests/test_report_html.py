"""The HTML report opens in a real browser (headless Debian chromium): it renders its plots, logs no
console error, needs no network, and escapes every string that came from a store or the user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.diff import run_diff
from qwen3dbg.registry import load_candidate
from qwen3dbg.reports.diff_html import render_html

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def report(catalogue_model, tmp_path_factory):
    """A report of a bug with decode steps, read from a store whose directory name is markup."""
    model = catalogue_model("moe")
    root = tmp_path_factory.mktemp("html")
    store = capture(load_candidate("rope-theta-1e4", model, "bfloat16"), forced_steps([9, 41, 7, 300, 12, 5], [77, 150]),
                    root / EVIL)
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
    assert "http://" not in text and "https://" not in text and "<script" not in text
    verdict, diagnosis, first_plot = (text.index("verdict bad"), text.index(result.diagnosis[0].signature),
                                      text.index("data:image/png;base64,"))
    assert verdict < diagnosis < first_plot
    assert text.count("data:image/png;base64,") == 3  # error vs layer, heatmap, per step (decode)
    assert text.count("<tr>") == len(result.taps)  # the full table: one body row per tap


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
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--window-size=1300,2600"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 3 and "qwen3dbg diff" in dom.stdout
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(shot)[..., :3]
    colourful = (pixels.max(-1) - pixels.min(-1)) > 0.25  # plot lines and the heatmap, not black text on white
    assert colourful.mean() > 0.01
