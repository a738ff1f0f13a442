"""make-model writes only where it may: a directory holding files it did not write is refused unless --replace,
and even then only what its marker says it wrote before is removed."""

from pathlib import Path

import pytest
from helpers import cli, released_checkpoint

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.synth import make_model
from qwen3dbg.util.outdir import MARKER


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("replace", [[], ["--replace"]], ids=["", "replace"])
def test_make_model_leaves_a_released_checkpoint_untouched_even_with_replace(tmp_path, replace, capsys):
    d = released_checkpoint(tmp_path / "ckpt")
    before = _snapshot(d)
    assert cli("make-model", d, *replace) == 2
    assert "did not write" in capsys.readouterr().err
    assert _snapshot(d) == before


def test_make_model_writes_beside_files_of_the_user_only_with_replace_and_keeps_them(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    assert cli("make-model", d) == 2 and "--replace" in capsys.readouterr().err
    assert _snapshot(d) == {"notes.txt": b"mine"}
    assert cli("make-model", d, "--replace") == 0
    assert (d / "notes.txt").read_text() == "mine"
    assert len(Checkpoint(d).keys()) > 0


def test_make_model_replaces_exactly_its_own_earlier_output(tmp_path, capsys):
    d = tmp_path / "m"
    assert cli("make-model", d, "--shard-size-mb", "0") == 0
    sharded = _snapshot(d)
    assert cli("make-model", d) == 2 and "--replace" in capsys.readouterr().err
    assert _snapshot(d) == sharded
    (d / "notes.txt").write_text("mine")
    assert cli("make-model", d, "--replace") == 0
    assert sorted(p.name for p in d.iterdir() if p.name != MARKER) == ["config.json", "model.safetensors", "notes.txt"]
    assert Checkpoint(d).digest() == Checkpoint(make_model(tmp_path / "fresh", "tiny-dense")).digest()


def test_make_model_does_not_trust_another_commands_marker(tmp_path, capsys):
    d = released_checkpoint(tmp_path / "ckpt")
    (d / MARKER).write_text('{"command": "capture", "files": ["config.json", "model-00001-of-00041.safetensors"]}')
    before = _snapshot(d)
    assert cli("make-model", d, "--replace") == 2
    assert _snapshot(d) == before
