"""Every side is checked before any model runs: a bad `--ref`/`--cand`/`--impl` costs no golden run and
no weights are loaded, whatever kind of side it is and whichever command is given it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli

from qwen3dbg.model.checkpoint import Checkpoint

PORT = "module:qwen3dbg.candidates.ports.standalone_qwen3:load"


def _refuse_running(monkeypatch):
    """Running a model or reading a weight fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran or a weight was read before the sides were checked")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)
    monkeypatch.setattr(Checkpoint, "get", refuse)


@pytest.fixture
def nothing_runs(monkeypatch):
    _refuse_running(monkeypatch)


def _bad_port_file(tmp_path):
    port = tmp_path / "port.py"
    port.write_text("import torch\n\ndef load(model_dir, dtype):\n    return torch.nn.Identity()\n")
    return port


BAD_SIDES = {
    "a typo of a catalogue bug": ("rope-theta-1e5", "did you mean rope-theta-1e4?"),
    "a typo of an implementation": ("scrach", "did you mean scratch?"),
    "an option the implementation does not take": ("hf:atn=sdpa", "has no option 'atn'"),
    "an option value the implementation refuses": ("hf:attn=flash", "choose eager"),
    "a port file that does not exist": ("module:nowhere/port.py:load", "does not exist"),
    "a port module without the factory": ("module:qwen3dbg.candidates.ports.standalone_qwen3:lode", "no function lode"),
    "a port without a mapping": ("module:{port}:load", "has no tap mapping"),
    "a port with a mapping that does not exist": (PORT + "@nowhere.toml", "nowhere.toml"),
    "a GGUF file that does not exist": ("llamacpp:nowhere.gguf", "no such GGUF file"),
    "an option value of our engine it refuses": ("mine:rmsnorm=bogus", "mine option rmsnorm='bogus'"),
    "a cache size that is not a number": ("mine:max_seq=lots", "mine option max_seq='lots'"),
    "the run's dtype as an option": ("hf:dtype=float16", "hf option dtype=float16: the run sets dtype"),
    "the run's model as an option": ("scratch:model_dir=m", "give it with --model"),
}


@pytest.mark.parametrize("command", ["diff", "capture"])
@pytest.mark.parametrize("what", list(BAD_SIDES))
def test_a_side_that_cannot_run_is_refused_before_any_model_runs(
    catalogue_model, tmp_path, capsys, nothing_runs, command, what
):
    side, words = BAD_SIDES[what]
    side = side.format(port=_bad_port_file(tmp_path))
    model = catalogue_model("dense")
    args = ["diff", "--cand", side] if command == "diff" else ["capture", "--impl", side, "--out", tmp_path / "o"]
    assert cli(*args, "--model", model, "--decode-steps", "2") == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_dtype_that_does_not_exist_is_refused_before_any_model_runs(catalogue_model, tmp_path, capsys, nothing_runs):
    assert (
        cli(
            "capture",
            "--impl",
            "hf",
            "--dtype",
            "fp8",
            "--model",
            catalogue_model("dense"),
            "--decode-steps",
            "2",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


def test_a_bad_reference_is_refused_before_any_model_runs(catalogue_model, capsys, nothing_runs):
    assert cli("diff", "--ref", "hf:attn=flash", "--cand", "scratch", "--model", catalogue_model("dense")) == 2
    assert "choose eager" in capsys.readouterr().err


def test_a_missing_extra_is_refused_before_any_model_runs(catalogue_model, tmp_path, capsys, monkeypatch):
    from qwen3dbg.model.gguf_io import write_gguf

    model = catalogue_model("dense")
    gguf = tmp_path / "m.gguf"
    write_gguf(model, gguf, gguf_type="f32")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    _refuse_running(monkeypatch)
    assert cli("diff", "--cand", f"llamacpp:{gguf}", "--model", model) == 2
    hint = re.search(r"pip install \S*\[llamacpp\]\S*", capsys.readouterr().err)[0]
    assert f"`{hint}`" in (Path(__file__).parents[2] / "README.md").read_text()  # the install README shows


def test_a_good_port_passes_the_check_without_building_its_model(catalogue_model, nothing_runs):
    from qwen3dbg.run.registry import check_candidate

    check_candidate(PORT, catalogue_model("dense"), "float32")


def test_the_litgpt_install_hint_is_the_one_readme_shows(catalogue_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "litgpt", None)
    _refuse_running(monkeypatch)
    assert cli("diff", "--cand", "litgpt", "--model", catalogue_model("dense")) == 2
    hint = re.search(r"pip install --no-deps \S+ && pip install \S*\[litgpt\]\S*", capsys.readouterr().err)[0]
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert f"`{hint}`" in readme
