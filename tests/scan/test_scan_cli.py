"""scan-checkpoint, diff-weights and make-model --format gguf through the real CLI: exit codes and views."""

from __future__ import annotations

import json

from helpers import cli

from qwen3dbg.model.synth import Plants, make_model


def test_clean_checkpoint_exits_0_and_writes_json_and_html(models, tmp_path):
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    assert cli("scan-checkpoint", models("tiny-moe"), "--json", j, "--html", h) == 0
    data = json.loads(j.read_text())
    assert data["counts"] == {"info": 0, "warning": 0, "error": 0} and len(data["tensors"]) > 0
    html = h.read_text()
    assert html.startswith("<!doctype html>") and "<img" in html  # the per-layer norm plot


def test_error_finding_exits_1_and_every_view_names_it(tmp_path):
    bad = "model.layers.0.mlp.up_proj.weight"
    d = make_model(tmp_path / "m", "tiny-dense", plants=Plants(nonfinite=(bad,)))
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    assert cli("scan-checkpoint", d, "--json", j, "--html", h) == 1
    findings = json.loads(j.read_text())["findings"]  # strict JSON: non-finite numbers are written as null
    assert [f["tensor"] for f in findings if f["check"] == "nonfinite"] == [bad]
    assert bad in h.read_text()


def test_warnings_exit_1_only_with_fail_on_warning(models):
    assert cli("scan-checkpoint", models("big-k-norm")) == 0
    assert cli("scan-checkpoint", models("big-k-norm"), "--fail-on", "warning") == 1
    assert cli("scan-checkpoint", models("big-k-norm"), "--fail-on", "warning", "--threshold", "100") == 0


def test_a_k_norm_of_500_and_a_ghost_bias_fail_by_default(tmp_path, capsys):
    for name, plants in (("k", Plants(k_norm_peak=500.0)), ("bias", Plants(ghost_bias=0.02))):
        assert cli("scan-checkpoint", make_model(tmp_path / name, "tiny-dense", plants=plants)) == 1
    assert "error" in capsys.readouterr().out


def test_not_a_checkpoint_exits_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli("scan-checkpoint", tmp_path / "missing") == 2
    assert cli("scan-checkpoint", tmp_path / "notes.txt") == 2
    assert cli("scan-checkpoint", tmp_path) == 2
    assert cli("scan-checkpoint", tmp_path, "--fail-on", "info") == 2


def test_a_negative_threshold_is_refused_with_exit_2(models, capsys):
    assert cli("scan-checkpoint", models("tiny-dense"), "--threshold", "-1") == 2
    assert "--threshold" in capsys.readouterr().err


def test_a_tap_store_is_refused_as_not_a_checkpoint(models, tmp_path, capsys):
    store = tmp_path / "taps"
    assert (
        cli(
            "capture",
            "--impl",
            "scratch",
            "--model",
            models("tiny-dense"),
            "--taps",
            "layers.0.attn_scores",
            "--out",
            store,
        )
        == 0
    )
    capsys.readouterr()
    assert cli("scan-checkpoint", store) == 2
    assert "is a tap store, not a checkpoint" in " ".join(capsys.readouterr().err.split())


def test_make_model_gguf_then_diff_weights_is_clean(models, tmp_path):
    g = tmp_path / "m.gguf"
    assert cli("make-model", g, "--preset", "tiny-moe", "--format", "gguf", "--gguf-type", "q8_0") == 0
    j, h = tmp_path / "d.json", tmp_path / "d.html"
    assert cli("diff-weights", models("tiny-moe"), g, "--json", j, "--html", h) == 0
    assert json.loads(j.read_text())["counts"]["error"] == 0
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in h.read_text()
    assert cli("diff-weights", models("tiny-dense"), g) == 1  # another model: missing and changed tensors
