"""capture writes only where it may: an --out holding files that are not a tap store is refused even with
--replace (the store's manifest is its record of what it wrote), and --replace keeps the user's own files."""

from pathlib import Path

import pytest
from helpers import cli, released_checkpoint

from qwen3dbg.tapstore.store import TapStore


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _capture(model, out, *extra):
    return cli(
        "capture", "--impl", "scratch", "--model", model, "--token-ids", "5", "--taps", "embed", "--out", out, *extra
    )


@pytest.mark.parametrize("replace", [[], ["--replace"]], ids=["", "replace"])
def test_capture_leaves_a_released_checkpoint_untouched_even_with_replace(tmp_path, models, replace):
    d = released_checkpoint(tmp_path / "ckpt")
    before = _snapshot(d)
    assert _capture(models("tiny-dense"), d, *replace) == 2
    assert _snapshot(d) == before


def test_capture_replaces_its_store_and_keeps_files_of_the_user(tmp_path, models):
    out = tmp_path / "out"
    assert _capture(models("tiny-dense"), out) == 0
    (out / "notes.txt").write_text("mine")
    assert _capture(models("tiny-dense"), out, "--replace") == 0
    assert (out / "notes.txt").read_text() == "mine" and TapStore.open(out).steps[0].token_ids == [[5]]
