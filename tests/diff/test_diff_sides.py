"""What --ref/--cand accept, introduced-vs-inherited, and the `diff` command's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, with_config
from typer.testing import CliRunner

from qwen3dbg.cli import app
from qwen3dbg.diff import run_diff
from qwen3dbg.diff.summary import summary
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.run.sides import parse_side
from qwen3dbg.util.errors import UserError

PROMPT, DECODE = [3, 1, 4, 1, 5, 9, 2, 6], [5]


@pytest.fixture(scope="module")
def store(catalogue_model, tmp_path_factory):
    """A bf16 store of the clean scratch reference, captured on PROMPT + DECODE."""
    model = catalogue_model("dense")
    out = capture(
        load_candidate("scratch", model, "bfloat16"),
        forced_steps(PROMPT, DECODE),
        tmp_path_factory.mktemp("side") / "s",
    )
    return model, out


def test_only_a_registered_name_takes_options_other_sides_pass_whole():
    assert parse_side("hf:attn=sdpa", "ref").options == {"attn": "sdpa"}
    external = parse_side("module:/src/port.py:load", "cand")
    assert (external.name, external.options) == ("module:/src/port.py:load", {})


def test_a_store_side_makes_the_other_sides_run_on_the_stores_own_ids_and_dtype(store):
    model, path = store
    result = run_diff("hf", f"store:{path}", model_dir=model)
    assert [s["token_ids"] for s in result.steps] == [PROMPT, DECODE]
    assert result.dtype == "bfloat16" and result.first_divergence is None


def test_ids_that_differ_from_the_stores_are_refused(store):
    model, path = store
    with pytest.raises(UserError, match="other token ids"):
        run_diff("hf", f"store:{path}", model_dir=model, token_ids=[1, 2, 3])


def test_empty_ids_beside_a_store_are_refused_not_dropped(store):
    model, path = store
    with pytest.raises(UserError, match="is empty"):
        run_diff("hf", f"store:{path}", model_dir=model, token_ids=[])


def test_a_dtype_other_than_the_stores_is_refused(store):
    model, path = store
    with pytest.raises(UserError, match="holds bfloat16"):
        run_diff("hf", f"store:{path}", model_dir=model, dtype="float32")


def test_an_incomplete_store_is_refused_with_its_reason_and_exit_2(store, tmp_path):
    model, path = store
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    exe = Path(sys.executable).with_name("qwen3dbg")  # the installed entry point, as a user runs it
    run = subprocess.run(
        [str(exe), "diff", "--cand", f"store:{broken}", "--model", str(model)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "incomplete" in run.stderr


def test_a_diff_of_running_sides_writes_nothing_to_disk(catalogue_model, tmp_path, monkeypatch):
    """The sides are compared as they run: no store of any side, no temporary file, anywhere we write."""
    monkeypatch.setenv("QWEN3DBG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = run_diff(
        "hf",
        "rope-theta-1e4",
        model_dir=catalogue_model("dense"),
        dtype="float32",
        token_ids=[11, 12, 13],
        decode_ids=[4, 5],
    )
    assert result.first_divergence is not None
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_teacher_forcing_finds_a_bug_introduced_by_its_layer_and_a_store_gets_an_estimate(catalogue_model, tmp_path):
    model = catalogue_model("dense")
    ran = run_diff("hf", "rope-theta-1e4", model_dir=model, dtype="float32", token_ids=PROMPT)
    assert ran.first_divergence.origin["method"] == "teacher forcing" and ran.first_divergence.origin["introduced"]
    path = capture(load_candidate("rope-theta-1e4", model, "float32"), forced_steps(PROMPT, []), tmp_path / "s")
    stored = run_diff("hf", f"store:{path}", model_dir=model)
    assert stored.first_divergence.origin["method"] == "error jump" and stored.first_divergence.origin["introduced"]


def test_diff_command_exits_1_on_a_divergence_and_its_json_names_the_first_divergent_tap(catalogue_model, tmp_path):
    out = tmp_path / "r.json"
    run = CliRunner().invoke(
        app,
        [
            "diff",
            "--cand",
            "embed-scaled",
            "--model",
            str(catalogue_model("dense")),
            "--dtype",
            "fp32",
            "--token-ids",
            "5,6,7",
            "--json",
            str(out),
        ],
    )
    assert run.exit_code == 1, run.output
    doc = json.loads(out.read_text())
    assert {k: doc["first_divergence"][k] for k in ("step", "layer", "tap")} == {
        "step": 0,
        "layer": None,
        "tap": "embed",
    }
    assert doc["diagnosis"] and {"signature", "message", "evidence"} <= set(doc["diagnosis"][0])


def test_diff_command_exits_0_on_a_clean_pair(catalogue_model):
    run = CliRunner().invoke(
        app,
        [
            "diff",
            "--ref",
            "hf",
            "--cand",
            "scratch",
            "--model",
            str(catalogue_model("dense")),
            "--dtype",
            "float32",
            "--token-ids",
            "5,6,7",
        ],
    )
    assert run.exit_code == 0, run.output
    assert "no divergence" in run.output


def test_a_broken_reference_is_called_suspect(catalogue_model):
    """Tolerances follow the reference's error: a reference with the wrong RoPE theta would pass a
    correct candidate and hide a broken one, so the result names it instead."""
    result = run_diff("rope-theta-1e4", "hf", model_dir=catalogue_model("dense"))
    assert result.suspect_reference is not None and result.suspect_reference.op in ("q_rope", "k_rope")
    assert any(
        label == "reference" and "--ref scratch --cand rope-theta-1e4 --model" in text
        for label, text in summary(result)
    )
    assert result.to_dict()["suspect_reference"]["tap"] == result.suspect_reference.name


@pytest.mark.parametrize("model", ["dense", "hot-qk", "moe"])
def test_a_correct_reference_is_not_suspect(catalogue_model, model):
    """Decode steps included: with k_norm weights ~100 a one-token attention row of a correct bf16
    reference is far from fp64 (a sharp softmax), which must not make it suspect."""
    result = run_diff("hf", "scratch", model_dir=catalogue_model(model), decode_steps=4)
    assert result.suspect_reference is None, result.suspect_reference


@pytest.mark.parametrize(
    "cand, words",
    [
        ("mine:bogus=1", "implementation 'mine' has no option 'bogus': its options are device, rmsnorm"),
        ("hf:foo=1", "implementation 'hf' has no option 'foo': its options are attn"),
        ("scratch:x=1", "implementation 'scratch' has no option 'x'"),
    ],
)
def test_an_unknown_option_key_is_named_with_the_options_the_implementation_takes(catalogue_model, capsys, cand, words):
    assert cli("diff", "--cand", cand, "--model", catalogue_model("dense"), "--token-ids", "5,6,7") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads is 0"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', it must be true or false"),
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
        ({"head_dim": 16}, "self_attn.q_proj.weight in"),
        ({"vocab_size": 1000}, "implies [1000, 64]: run `qwen3dbg scan-checkpoint"),
    ],
)
def test_a_config_the_weights_or_types_contradict_is_exit_2_before_anything_runs(
    models, tmp_path, capsys, changes, words
):
    model = with_config(models("tiny-dense"), tmp_path / "m", **changes)
    assert cli("diff", "--cand", "scratch", "--model", model, "--dtype", "fp32", "--token-ids", "5,6,7") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "outputs, words",
    [
        (["--json", "{tmp}/no/such/r.json", "--html", "{tmp}/ok.html"], "cannot write"),
        (["--json", "{tmp}/r", "--html", "{tmp}/r"], "--json and --html both name"),
        (["--json", "-"], "'-' is not an output file"),
        (["--html", "{tmp}"], "Is a directory"),
    ],
)
def test_output_files_are_checked_before_the_diff_runs(models, tmp_path, monkeypatch, capsys, outputs, words):
    monkeypatch.setattr("qwen3dbg.diff.run_diff", lambda *a, **k: pytest.fail("the diff ran"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in outputs]
    assert cli("diff", "--cand", "scratch", "--model", models("tiny-dense"), *args) == 2
    assert words in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


def test_a_prefill_only_diff_says_the_decode_path_went_unchecked(catalogue_model):
    def notes(**steps):
        result = run_diff("hf", "scratch", model_dir=catalogue_model("dense"), token_ids=[5, 6, 7], **steps)
        return [text for label, text in summary(result) if label == "note" and "decode-steps" in text]

    assert notes() and not notes(decode_steps=1)


def test_a_store_captured_on_other_weights_is_bad_input_named_as_such(tmp_path, capsys):
    """`qwen3dbg capture` records a digest of the weights; diffed against another model (here another
    seed, same shapes) every difference would be the weights': exit 2 with that cause, not a divergence."""
    from qwen3dbg.model.synth import make_model

    ours, other = make_model(tmp_path / "ours", "tiny-dense"), make_model(tmp_path / "other", "tiny-dense", seed=1)
    assert cli("capture", "--impl", "scratch", "--model", ours, "--token-ids", "5,6,7", "--out", tmp_path / "s") == 0
    capsys.readouterr()
    assert cli("diff", "--cand", f"store:{tmp_path / 's'}", "--model", other) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "captured on other weights than" in err and "divergence" not in err
    assert cli("diff", "--cand", f"store:{tmp_path / 's'}", "--model", ours) == 0


def test_a_store_captured_on_another_model_shape_is_bad_input_named_as_such(models, tmp_path, capsys):
    store = tmp_path / "s"
    assert cli("capture", "--impl", "scratch", "--model", models("tiny-dense"), "--token-ids", "5", "--out", store) == 0
    capsys.readouterr()
    assert cli("diff", "--cand", f"store:{store}", "--model", models("tiny-moe")) == 2
    assert "another model" in " ".join(capsys.readouterr().err.split())


@pytest.mark.filterwarnings("error::UserWarning")  # an empty panel is said in words, not left to matplotlib
def test_a_store_of_selected_taps_diffs_and_writes_its_reports(models, tmp_path):
    """capture --taps keeps a few taps: the diff compares those, and the HTML and JSON still render."""
    model, store = models("tiny-dense"), tmp_path / "s"
    assert (
        cli("capture", "--impl", "scratch", "--model", model, "--out", store, "--taps", "embed", "--decode-steps", "1")
        == 0
    )
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    assert cli("diff", "--cand", f"store:{store}", "--model", model, "--html", html, "--json", js) == 0
    assert "No tap inside the layers was compared" in html.read_text()
    assert json.loads(js.read_text())["first_divergence"] is None


def test_a_side_stopped_by_another_sides_failure_reports_that_failure():
    """The comparison may be waiting on a side that only stopped because another one failed: what it raises
    is the failure, not that the waited-on side stopped."""
    from qwen3dbg.diff.streams import Schedule, ThreadSide

    schedule = Schedule([], 1)  # step 0 is never published: the first side waits until cancelled

    def fail(sink):
        raise ValueError("the candidate's own bug")

    waiting = ThreadSide("golden", lambda sink: schedule.get(0), lambda n: True, True, schedule)
    failing = ThreadSide("cand", fail, lambda n: True, True, schedule)
    try:
        with pytest.raises(ValueError, match="the candidate's own bug"):
            waiting.take(0, "embed")
    finally:
        waiting.close(), failing.close()
