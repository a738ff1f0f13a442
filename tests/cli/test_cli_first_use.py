"""What a new user sees first: help that reads without type noise, --version, make-model's preset list
without an output path, counts in plain English, no blank first line on stderr, and no third-party
warnings or banners in our output unless --verbose asks for them."""

from __future__ import annotations

import warnings

import pytest
from helpers import cli
from typer.testing import CliRunner

from qwen3dbg.cli import app
from qwen3dbg.model.synth import PRESETS

COMMANDS = [c.name for c in app.registered_commands]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_bool_type_beside_a_flag(command):
    out = CliRunner().invoke(app, [*([command] if command else []), "--help"]).output
    assert "--help" in out and "<bool>" not in out


@pytest.mark.parametrize("command", ["diff", "capture"])
def test_decode_steps_help_states_its_default(command):
    out = CliRunner().invoke(app, [command, "--help"]).output
    assert "Default: 0 (prefill only)" in " ".join(out.replace("│", " ").split()), out


def test_version_prints_the_package_version():
    from importlib.metadata import version

    run = CliRunner().invoke(app, ["--version"])
    assert run.exit_code == 0 and run.output.strip() == f"qwen3dbg {version('qwen3dbg')}"


def test_list_presets_needs_no_output_path():
    run = CliRunner().invoke(app, ["make-model", "--list-presets"])
    assert run.exit_code == 0 and all(name in run.output for name in PRESETS)


def test_make_model_without_an_output_path_says_so_in_one_line(capsys):
    assert cli("make-model") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "output path" in err and err.count("\n") == 1


@pytest.mark.parametrize("n, words", [(1, "1 decode step,"), (2, "2 decode steps,")])
def test_step_counts_read_as_english(catalogue_model, tmp_path, capsys, n, words):
    model = catalogue_model("dense")
    assert (
        cli(
            "capture",
            "--impl",
            "scratch",
            "--model",
            model,
            "--token-ids",
            "1,2",
            "--decode-steps",
            n,
            "--out",
            tmp_path / "s",
        )
        == 0
    )
    assert words in capsys.readouterr().err
    assert (
        cli(
            "diff",
            "--cand",
            "scratch",
            "--ref",
            "scratch",
            "--model",
            model,
            "--token-ids",
            "1,2",
            "--decode-steps",
            n,
            "--dtype",
            "fp32",
        )
        == 0
    )
    assert words.rstrip(",") in " ".join(capsys.readouterr().out.split())


def _commands(model, tmp_path):
    return {
        "make-model": ["make-model", tmp_path / "m"],
        "capture": ["capture", "--impl", "scratch", "--model", model, "--token-ids", "1,2", "--out", tmp_path / "s"],
        "scan-checkpoint": ["scan-checkpoint", model],
        "diff-weights": ["diff-weights", model, model],
    }


@pytest.mark.parametrize("command", ["make-model", "capture", "scan-checkpoint", "diff-weights"])
def test_stderr_does_not_begin_with_a_blank_line(catalogue_model, tmp_path, capfd, command):
    assert cli(*_commands(catalogue_model("dense"), tmp_path)[command]) == 0
    err = capfd.readouterr().err
    assert not err.startswith("\n"), repr(err[:80])


def _capture_hf(model, out, *flags) -> tuple[list[str], list[str]]:
    """Python warnings and transformers' log records raised while `capture --impl hf` runs (the records
    through a handler of our own: transformers' own handler holds whichever stderr it met first)."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (
                cli(
                    "capture",
                    "--impl",
                    "hf",
                    "--model",
                    model,
                    "--token-ids",
                    "1,2",
                    "--decode-steps",
                    1,
                    "--out",
                    out,
                    *flags,
                )
                == 0
            )
    finally:
        hf_logger.removeHandler(handler)
    return [str(w.message) for w in caught], records


def test_third_party_warnings_and_banners_stay_out_of_our_output(catalogue_model, tmp_path, capfd):
    """On a model with ghost biases transformers logs a LOAD REPORT with raw ANSI codes, and its forward
    warns that past_key_values is deprecated: neither reaches the user."""
    warned, logged = _capture_hf(catalogue_model("ghost-bias"), tmp_path / "s")
    err = capfd.readouterr().err
    assert not warned and not logged, (warned, logged)
    assert "LOAD REPORT" not in err and "\x1b[" not in err and "Warning" not in err


def test_verbose_lets_third_party_warnings_and_banners_through(catalogue_model, tmp_path):
    warned, logged = _capture_hf(catalogue_model("ghost-bias"), tmp_path / "s", "--verbose")
    assert any("LOAD REPORT" in r for r in logged), logged


def test_overlapping_quiet_calls_from_two_threads_restore_the_state_they_found():
    """The diff runs hf sides in threads: whichever call ends last restores, and nothing stays silenced."""
    import threading

    from transformers.utils import logging as hf_logging

    from qwen3dbg.util.third_party import quiet_transformers, set_verbose

    set_verbose(False)  # as a command without --verbose leaves it
    filters, level = list(warnings.filters), hf_logging.get_verbosity()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with quiet_transformers():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with quiet_transformers():
        second_in.set()
        first_out.wait(5)
        assert hf_logging.get_verbosity() == hf_logging.ERROR  # the other call's end did not end this one's
    thread.join()
    assert list(warnings.filters) == filters and hf_logging.get_verbosity() == level
