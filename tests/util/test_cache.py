"""`qwen3dbg cache`: what qwen3dbg keeps under its home, least recently used first, within a budget."""

from __future__ import annotations

import os
import time

import pytest
from helpers import cli

from qwen3dbg.util.errors import UserError
from qwen3dbg.util.home import clear, entries, fit, parse_size


def _entry(home, folder: str, name: str, size: int, age_h: float):
    path = home / folder / name
    path.mkdir(parents=True)
    (path / "data").write_bytes(b"x" * size)
    t = time.time() - age_h * 3600
    for p in (path / "data", path):
        os.utime(p, (t, t))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3DBG_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # never the machine's builds
    return tmp_path


def test_entries_are_listed_by_kind_least_recently_used_first(home):
    _entry(home, "runs", "hf-bfloat16-old", 300, 48)
    _entry(home, "models", "tiny-dense-seed0-abc", 200, 2)
    found = entries()
    assert [(e.path.name, e.kind, e.size >= s) for e, s in zip(found, (300, 200))] == [
        ("hf-bfloat16-old", "old run", True),
        ("tiny-dense-seed0-abc", "default model", True),
    ]


@pytest.mark.parametrize("budget,left", [("1KB", {"new"}), ("0", {"new"}), ("10GB", {"old", "mid", "new"})])
def test_fitting_the_budget_evicts_the_least_recently_used_first_and_never_what_was_just_added(
    home, monkeypatch, budget, left
):
    monkeypatch.setenv("QWEN3DBG_CACHE_BUDGET", budget)
    _entry(home, "runs", "old", 600, 30)
    _entry(home, "runs", "mid", 600, 20)
    new = _entry(home, "models", "new", 600, 0)
    fit(keep=new)
    assert {e.path.name for e in entries()} == left


def test_an_entry_used_minutes_ago_is_kept_even_over_budget(home, monkeypatch):
    monkeypatch.setenv("QWEN3DBG_CACHE_BUDGET", "0")
    _entry(home, "runs", "in-use", 600, 0.01)
    assert fit() == [] and [e.path.name for e in entries()] == ["in-use"]


def test_clear_removes_everything_and_the_command_lists_then_clears(home, capsys):
    _entry(home, "runs", "a", 10, 1)
    _entry(home, "kernels", "b", 10, 1)
    assert cli("cache") == 0 and "2 entries" in capsys.readouterr().out
    assert cli("cache", "--clear") == 0
    assert entries() == [] and clear() == []


@pytest.mark.parametrize("text", ["lots", "10 parsecs", "-1GB", ""])
def test_a_budget_that_is_no_size_is_refused_in_one_sentence(text):
    with pytest.raises(UserError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text,size", [("10GB", 10**10), ("500 MB", 5 * 10**8), ("1.5GiB", 3 << 29), ("0", 0)])
def test_budgets_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


def test_the_engine_build_torch_keeps_is_listed_with_its_size_and_cleared_and_nothing_else_of_torchs(home, capsys):
    build = _entry(home, "torch_extensions", "qwen3dbg_mine_cpu_da076dd8", 3_000_000, 5)
    other = _entry(home, "torch_extensions", "someone_elses_op", 10, 5)
    _entry(home, "runs", "a", 10, 1)
    assert cli("cache") == 0
    listed = capsys.readouterr().out
    assert "qwen3dbg_mine_cpu_da076dd8" in listed and "engine build" in listed and "3.0 MB" in listed
    assert "someone_elses_op" not in listed and "2 entries" in listed
    assert cli("cache", "--clear") == 0
    assert not build.exists() and other.exists() and entries() == []


def test_the_budget_never_evicts_an_engine_build(home, monkeypatch):
    monkeypatch.setenv("QWEN3DBG_CACHE_BUDGET", "0")
    build = _entry(home, "torch_extensions", "qwen3dbg_mine_cpu_x", 600, 48)
    fit()
    assert build.exists()
