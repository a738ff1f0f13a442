"""The command line's printer and writers against text from users and files: rich markup, :emoji: codes,
lone surrogates. Whatever a path, a tap name or an error message holds prints and is written as it is."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import cli, edit_safetensors_header
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from qwen3dbg.reference.qwen3 import Qwen3Reference
from safetensors.torch import load_file, save_file

from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.util.errors import UserError

#: pieces that mean something to rich (markup tags, escapes, emoji codes) or to a format string
MARKUP = [
    "[/]",
    "[bold]",
    "[/bold]",
    "[red]",
    "[llamacpp]",
    "[link=https://x]",
    "[@click=quit]",
    ":smile:",
    ":warning:",
    "\\",
    "\\[",
    "[",
    "]",
    "[[",
    "]]",
    "%s",
    "{}",
    "'",
    '"',
    " ",
    "a",
    "é",
    "∑",
]
#: printable text where rich's syntax is dense (no control characters: the terminal strips those)
nasty = st.lists(
    st.sampled_from(MARKUP) | st.text(st.characters(categories=["L", "N", "P", "S"]), max_size=3),
    min_size=1,
    max_size=12,
).map("".join)
#: file-name safe: no separator, not `.` or `..`
nasty_name = nasty.map(lambda s: "n" + s.replace("/", "|"))
fixtures_ok = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@settings(max_examples=150, derandomize=True)
@given(text=nasty)
def test_escaped_text_prints_as_written_inside_markup_of_ours(text):
    from rich.markup import render

    from qwen3dbg.util.text import escape

    assert render(f"[bold]{escape(text)}[/]", emoji=False).plain == text
    if not text.endswith("\\"):  # alone at the end of a line, trailing backslashes print doubled (see escape)
        assert render(escape(text), emoji=False).plain == text


@fixtures_ok
@given(message=nasty)
@example(message="llamacpp: candidates need llama-cpp-python: pip install '.[llamacpp]'")
@example(message="cannot write into /tmp/a[/]b: Permission denied")
def test_the_error_printer_prints_any_message_as_written(monkeypatch, capsys, message):
    def refuse(*a, **k):
        raise UserError(message)

    monkeypatch.setattr("qwen3dbg.tapstore.validate.validate_store", refuse)
    assert cli("validate-store", "anything") == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@fixtures_ok
@given(name=nasty_name)
def test_paths_in_messages_print_as_written(tmp_path, capsys, name):
    missing = tmp_path / name / "store"
    assert cli("validate-store", missing) == 2
    assert f"error: {missing} is not a tap store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def store(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "store"
    capture(Qwen3Reference(models("tiny-dense"), "bfloat16"), forced_steps([5, 17], []), out, patterns=["embed"])
    return out


@fixtures_ok
@given(name=nasty_name)
def test_a_store_at_any_path_and_tap_names_from_its_files_print_as_written(tmp_path, capsys, store, name):
    """validate-store's verdict quotes the path; its problems quote tap names read from the step files."""
    here = tmp_path / name
    shutil.rmtree(here, ignore_errors=True)
    shutil.copytree(store, here)
    assert cli("validate-store", here) == 0
    assert capsys.readouterr().err == f"{here}: valid tap store\n"
    step = here / "step_0000.safetensors"
    save_file(load_file(step) | {name: load_file(step)["embed"]}, step)
    assert cli("validate-store", here) == 1
    assert f"problem step 0, {name}: is no op of the schema" in capsys.readouterr().err


def _surrogate_names():
    """Tensor names holding a lone surrogate, as a `\\ud800`-style escape in a safetensors header gives."""
    return st.tuples(nasty, st.characters(categories=["Cs"]), nasty).map("".join)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_surrogate_names())
def test_reports_quoting_names_with_lone_surrogates_are_valid_utf8(tmp_path, capsys, name):
    f = tmp_path / "w.safetensors"
    save_file({"placeholder": torch.ones(4)}, f)
    edit_safetensors_header(f, lambda h: {name: h["placeholder"]})
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    # The bounded JSON reader refuses a header that escapes a lone surrogate: an error finding, and the
    # reports quoting it stay strict UTF-8.
    assert cli("scan-checkpoint", f, "--json", out_json, "--html", out_html) == 1
    assert "surrogate" in capsys.readouterr().out.replace("\n", " ")
    json.loads(out_json.read_bytes().decode("utf-8"))  # strict UTF-8: no surrogate survived
    assert out_html.read_bytes().decode("utf-8")
