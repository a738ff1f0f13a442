"""The capture and make-model commands, through the real CLI, and their one-line errors (exit 2)."""

import json

import pytest
import torch
from helpers import cli, rewrite_checkpoint, with_config
from typer.testing import CliRunner

from qwen3dbg.cli import app
from qwen3dbg.tapstore.schema import step_taps
from qwen3dbg.tapstore.store import TapStore

runner = CliRunner()


def test_capture_writes_a_complete_store_with_recorded_greedy_decode_ids(models, tmp_path):
    out = tmp_path / "taps"
    assert (
        cli(
            "capture",
            "--impl",
            "scratch",
            "--model",
            models("tiny-moe"),
            "--token-ids",
            "5,17,99,3",
            "--decode-steps",
            "2",
            "--dtype",
            "bf16",
            "--out",
            out,
        )
        == 0
    )
    store = TapStore.open(out)
    assert store.implementation == "scratch" and store.dtype == torch.bfloat16
    assert [s.tokens for s in store.steps] == [4, 1, 1]
    assert store.steps[2].positions == [[5]]
    # The decode ids are the greedy choices of the fp64 golden, recorded for every other side to reuse.
    from qwen3dbg.reference.qwen3 import Qwen3Reference
    from qwen3dbg.run.candidate import NullSink

    golden, picked, ids = Qwen3Reference(models("tiny-moe")), [], [[5, 17, 99, 3]]
    for position in ([0, 1, 2, 3], [4]):
        logits = golden.step(torch.tensor(ids), torch.tensor([position]), NullSink())
        picked.append(int(logits[0, -1].argmax()))
        ids = [[picked[-1]]]
    assert [s.token_ids[0][0] for s in store.steps[1:]] == picked
    cfg = store.manifest["config"]
    assert set(store.names(1)) == {
        t.name for t in step_taps(__import__("qwen3dbg.model.config").model.config.parse_config(cfg), 1, 1, 5)
    }


def test_capture_hf_sdpa_says_which_path_ran_and_which_taps_it_lacks(models, tmp_path):
    out = tmp_path / "sdpa"
    assert cli("capture", "--model", models("tiny-dense"), "--attn", "sdpa", "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["attn_implementation"] == "sdpa" and m["missing_taps"] == ["attn_probs", "attn_scores"]
    assert not TapStore.open(out).has(0, "layers.0.attn_probs")


@pytest.mark.parametrize(
    "impl, manifest",
    [
        ("hf:attn=sdpa", {"attn_implementation": "sdpa"}),
        ("mine:rmsnorm=fused", {"numerics": {"rmsnorm": "fused", "scores": "compute", "accum": "fp32"}}),
    ],
)
def test_capture_takes_an_implementations_options_as_diff_does(models, tmp_path, impl, manifest):
    out = tmp_path / "store"
    assert cli("capture", "--model", models("tiny-dense"), "--impl", impl, "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert {k: m.get(k) for k in manifest} == manifest


def test_taps_pattern_selects_and_a_pattern_matching_nothing_is_an_error(models, tmp_path):
    out = tmp_path / "sel"
    assert (
        cli(
            "capture",
            "--model",
            models("tiny-dense"),
            "--taps",
            "layers.*.attn_probs",
            "--taps",
            "logits",
            "--out",
            out,
        )
        == 0
    )
    assert sorted(TapStore.open(out).names(0)) == [
        "layers.0.attn_probs",
        "layers.1.attn_probs",
        "layers.2.attn_probs",
        "logits",
    ]
    assert cli("capture", "--model", models("tiny-dense"), "--taps", "nope*", "--out", tmp_path / "x") == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "{missing}"], "does not exist"),
        (["--model", "{llama}"], "not a Qwen3 model"),
        (["--token-ids", "5,x,7"], "not a comma-separated list"),
        (["--token-ids", "5,100000"], "outside the vocabulary"),
        (["--decode-ids", "1", "--decode-steps", "2"], "not both"),
        (["--prompt", "hello"], "has no tokenizer"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--impl", "nope"], "unknown implementation"),
        (["--model", "{file}"], "is a file: pass the directory"),
        (
            ["--model", "{wrong-vocab}"],
            "has shape [512, 64] but its config.json implies [1000, 64]: run `qwen3dbg scan-checkpoint",
        ),
        (["--model", "{no-up-proj}"], "lacks 1 tensor(s) its config.json implies, model.layers.1.mlp.up_proj.weight"),
        (["--token-ids", ""], "--token-ids is empty"),
        (["--prompt", ""], "--prompt is empty"),
        (["--decode-ids", ""], "--decode-ids is empty"),
        (["--impl", "scratch", "--attn", "sdpa"], "--attn 'sdpa': an option of hf"),
        (["--impl", "hf:attn=sdpa", "--attn", "eager"], "given once"),
        (["--impl", "hf", "--attn", ""], "--attn '': an option of hf"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(models, tmp_path, capsys, args, words):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    subst = {
        "{missing}": str(tmp_path / "nowhere"),
        "{llama}": str(llama),
        "{file}": str(models("tiny-dense") / "config.json"),
        "{wrong-vocab}": str(with_config(models("tiny-dense"), tmp_path / "vocab", vocab_size=1000)),
        "{no-up-proj}": str(
            rewrite_checkpoint(
                models("tiny-dense"),
                tmp_path / "no-up",
                lambda ts: {n: t for n, t in ts.items() if n != "model.layers.1.mlp.up_proj.weight"},
            )
        ),
    }
    args = [subst.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", str(models("tiny-dense"))]
    assert cli("capture", *args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert words in " ".join(err.split()) and "Traceback" not in err


def test_make_model_lists_presets_and_writes_a_sharded_checkpoint(tmp_path):
    listing = runner.invoke(app, ["make-model", str(tmp_path), "--list-presets"])
    assert "qwen3-0.6b" in listing.output and "tiny-moe-nonorm" in listing.output
    assert cli("make-model", tmp_path / "m", "--preset", "tiny-moe", "--shard-size-mb", "0") == 0
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert cli("make-model", tmp_path / "n", "--preset", "nope") == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["make-model", "{file}"], "cannot write into {file}: {file} is a file, not a directory"),
        (["make-model", "{file}/sub"], "{file} is a file, not a directory"),
        (["make-model", "{file}/m.gguf", "--format", "gguf"], "{file} is a file, not a directory"),
        (["make-model", "{tmp}", "--format", "gguf"], "{tmp} is a directory: name the .gguf file"),
        (["capture", "--out", "{file}"], "cannot write into {file}: {file} is a file"),
        (["capture", "--out", "/proc/qwen3dbg-taps"], "cannot write into /proc/qwen3dbg-taps"),
        (["make-model", "{tmp}/m", "--shard-size-mb", "-1"], "--shard-size-mb"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, args, words):
    (tmp_path / "f").write_text("not a directory")
    subst = {"{file}": str(tmp_path / "f"), "{tmp}": str(tmp_path)}

    def fill(text):
        for k, v in subst.items():
            text = text.replace(k, v)
        return text

    assert cli(*map(fill, args)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert fill(words) in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_capture_without_arguments_uses_the_embedded_default_model(tmp_path):
    assert cli("capture", "--impl", "scratch", "--out", tmp_path / "d") == 0
    assert TapStore.open(tmp_path / "d").steps[0].tokens == 16


def test_an_output_file_that_cannot_be_written_is_one_clear_line_and_exit_2(models, tmp_path, capsys):
    missing_dir = tmp_path / "no" / "such" / "dir"
    assert (
        cli(
            "diff",
            "--ref",
            "hf",
            "--cand",
            "scratch",
            "--model",
            models("tiny-dense"),
            "--dtype",
            "fp32",
            "--token-ids",
            "5,6,7",
            "--json",
            missing_dir / "r.json",
        )
        == 2
    )
    assert cli("scan-checkpoint", models("tiny-dense"), "--html", missing_dir / "r.html") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("cannot write") == 2 and "Traceback" not in err


@pytest.mark.parametrize("command", [["capture", "--out", "{tmp}/taps"], ["diff", "--cand", "scratch"]])
def test_capture_and_diff_parse_the_same_input_flags_into_the_same_run_inputs(monkeypatch, tmp_path, command):
    """Both commands hand their flags to RunInputs.from_flags and nothing else: the same flags, the same inputs."""
    from qwen3dbg.run.inputs import RunInputs

    parsed, parse = [], RunInputs.from_flags

    def spy(*flags):
        parsed.append(parse(*flags))
        raise SystemExit(0)  # the parse is all this test needs, not the run

    monkeypatch.setattr(RunInputs, "from_flags", staticmethod(spy))
    cli(*[a.replace("{tmp}", str(tmp_path)) for a in command], "--token-ids", "5, 17,99", "--decode-ids", "7")
    assert parsed == [RunInputs(token_ids=(5, 17, 99), decode_ids=(7,))]


@pytest.mark.parametrize("command", [["capture", "--out", "{tmp}/taps"], ["diff", "--cand", "scratch"]])
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--token-ids", "5,x"], "--token-ids '5,x' is not a comma-separated list of integers, e.g. '5,17,99'"),
        (["--decode-ids", ","], "--decode-ids is empty: give at least one token id"),
        (["--prompt", "hi", "--token-ids", "5"], "give either --token-ids or --prompt, not both"),
        (["--decode-steps", "-1"], "--decode-steps must be 0 or more"),
    ],
)
def test_bad_input_flags_are_one_sentence_and_the_same_for_capture_and_diff(
    models, tmp_path, capsys, command, flags, words
):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert cli(*args, "--model", models("tiny-dense"), *flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == f"error: {words}"
    assert not (tmp_path / "taps").exists()
