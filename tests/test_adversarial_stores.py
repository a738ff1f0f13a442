"""Tap stores written by strangers: what validate-store and diff accept, refuse and explain (docs/bad-input.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPT, cli, first_divergence
from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.config import load_config
from qwen3dbg.reference.qwen3 import Qwen3Reference
from qwen3dbg.errors import UserError
from qwen3dbg.store import StepInfo, StoreWriter, TapStore
from qwen3dbg.validate import validate_store


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


def _rewrite_taps(store: Path, edit) -> None:
    """Pass every step file of `store` through `edit(step, taps) -> taps`."""
    for s in range(len(TapStore.open(store).steps)):
        f = store / f"step_{s:04d}.safetensors"
        save_file(edit(s, load_file(f)), f)


def _fp32_softmax(step, taps):
    """attn_probs as a bf16 engine with an fp32 softmax keeps them: from its own bf16 scores, not rounded back."""
    return taps | {n.replace("attn_scores", "attn_probs"): torch.softmax(t.float(), -1)
                   for n, t in taps.items() if n.endswith("attn_scores")}


def _golden_fp32(golden: Path):
    """Every float tap kept in fp32 as an engine more accurate than its store's dtype would: fp64 rounded once."""
    def edit(step, taps):
        gold = TapStore.open(golden)
        return {n: gold.get(step, n).float() if t.is_floating_point() else t for n, t in taps.items()}
    return edit


@pytest.mark.parametrize("kept_wider", ["fp32 attn_probs", "every tap in fp32"])
def test_a_bf16_store_with_taps_kept_in_fp32_validates_and_diffs_clean(tmp_path, dense, kept_wider):
    steps = forced_steps(PROMPT, [42])
    out = tmp_path / "store"
    capture(Qwen3Reference(dense, "bfloat16"), steps, out)
    if kept_wider == "fp32 attn_probs":
        _rewrite_taps(out, _fp32_softmax)
    else:
        capture(Qwen3Reference(dense, "float64"), steps, tmp_path / "golden")
        _rewrite_taps(out, _golden_fp32(tmp_path / "golden"))
    store = TapStore.open(out)
    assert store.dtype == torch.bfloat16 and store.get(0, "layers.0.attn_probs").dtype == torch.float32
    assert validate_store(out, load_config(dense)) == []
    assert first_divergence(dense, f"store:{out}") is None


# ---- one writer per directory ---------------------------------------------------------------------

def _write(out: Path, value: float, *, replace: bool = False, steps: int = 1) -> None:
    with StoreWriter(out, f"writer-{value}", "float32", 1, replace=replace) as w:
        for s in range(steps):
            w.begin_step(StepInfo(s, [[5]], [[s]]), {"embed": (1, 1, 2)})
            w("embed", torch.full((1, 1, 2), value))
            w.end_step()


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


def _user_file(d):
    d.mkdir()
    (d / "notes.txt").write_text("mine")


def _incomplete(d):
    with pytest.raises(RuntimeError):
        with StoreWriter(d, "crashed", "float32", 1):
            raise RuntimeError("engine crashed")


PRIOR = {
    "absent": lambda d: None,
    "empty": lambda d: d.mkdir(),
    "a file of the user's": _user_file,
    "a complete store of 3 steps": lambda d: _write(d, 1.0, steps=3),
    "an incomplete store": _incomplete,
}


@pytest.mark.parametrize("replace", [False, True], ids=["", "replace"])
@pytest.mark.parametrize("prior", list(PRIOR))
def test_a_writer_takes_a_directory_only_when_it_may_and_then_holds_only_its_own_steps(tmp_path, prior, replace):
    out = tmp_path / "out"
    PRIOR[prior](out)
    before = _snapshot(out)
    may = prior in ("absent", "empty") or (replace and "store" in prior)
    if not may:
        with pytest.raises(UserError, match="not a tap store" if "user" in prior else "--replace"):
            _write(out, 2.0, replace=replace)
        assert _snapshot(out) == before
        return
    _write(out, 2.0, replace=replace)
    store = TapStore.open(out)
    assert store.implementation == "writer-2.0" and len(store.steps) == 1
    assert sorted(p.name for p in out.glob("step_*")) == ["step_0000.safetensors"]
    assert torch.equal(store.get(0, "embed"), torch.full((1, 1, 2), 2.0))


@pytest.mark.parametrize("replace", [False, True], ids=["", "replace"])
def test_a_second_writer_is_refused_while_the_first_writes_and_the_store_is_the_first_ones(tmp_path, replace):
    out = tmp_path / "out"
    with StoreWriter(out, "first", "float32", 1) as first:
        with pytest.raises(UserError, match="another writer"):
            StoreWriter(out, "second", "float32", 1, replace=replace)
        first.begin_step(StepInfo(0, [[5]], [[0]]), {"embed": (1, 1, 2)})
        first("embed", torch.zeros(1, 1, 2))
        first.end_step()
    assert TapStore.open(out).implementation == "first"


C_HOLDER = r"""
#define QWEN3DBG_TAPS_IMPLEMENTATION
#include "qwen3dbg_taps.h"
int main(int argc, char **argv) {
    int64_t ids[1] = {5}, pos[1] = {0}, shape[3] = {1, 1, 2};
    float x[2] = {3, 3};
    q3t_store *s = q3t_open(argv[1], "c-writer", "float32", 1);
    (void)argc;
    if (q3t_error(s)[0]) { fprintf(stderr, "%s\n", q3t_error(s)); q3t_abandon(s); return 3; }
    if (q3t_begin_step(s, 0, 1, ids, pos) || q3t_write(s, "embed", Q3T_F32, 3, shape, x) || q3t_end_step(s)) return 1;
    puts("holding"); fflush(stdout);
    getchar();  /* hold the store open until told to close it */
    return q3t_close(s) ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def c_writer(tmp_path_factory) -> Path:
    from test_ext_c import C_DIR, FLAGS, _compiler

    d = tmp_path_factory.mktemp("c_writer")
    (d / "w.c").write_text(C_HOLDER)
    subprocess.run([_compiler("cc"), "-std=c99", "-O1", *FLAGS, "-I", str(C_DIR), "-o", str(d / "w"), str(d / "w.c")],
                   check=True)
    return d / "w"


def test_the_c_writer_and_ours_take_the_same_lock(tmp_path, c_writer):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([str(c_writer), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    with pytest.raises(UserError, match="another writer"):
        StoreWriter(out, "python", "float32", 1, replace=True)
    holder.communicate("\n", timeout=30)
    assert holder.returncode == 0 and TapStore.open(out).implementation == "c-writer"
    with StoreWriter(out, "python", "float32", 1, replace=True):
        refused = subprocess.run([str(c_writer), str(out)], input="\n", capture_output=True, text=True, timeout=30)
        assert refused.returncode == 3 and "another writer" in refused.stderr


def test_capture_refuses_an_out_holding_a_store_unless_told_to_replace_it(tmp_path, dense, capsys):
    out = tmp_path / "out"

    def run(ids, *extra):
        return cli("capture", "--impl", "scratch", "--model", dense, "--token-ids", ids, "--taps", "embed",
                   "--out", out, *extra)

    assert run("5,17") == 0
    first = _snapshot(out)
    assert run("5,17") == 2 and "pass --replace" in capsys.readouterr().err
    assert _snapshot(out) == first
    assert run("9", "--replace") == 0
    assert TapStore.open(out).steps[0].token_ids == [[9]]
