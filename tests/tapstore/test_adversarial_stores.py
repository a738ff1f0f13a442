"""Tap stores written by strangers: what validate-store and diff accept, refuse and explain (docs/bad-input.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import C_DIR, C_FLAGS, PROMPT, cli, compiler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qwen3dbg.reference.qwen3 import Qwen3Reference
from safetensors.torch import load_file, save_file

from qwen3dbg.diff import run_diff
from qwen3dbg.model.config import load_config
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.tapstore.store import StepInfo, StoreWriter, TapStore
from qwen3dbg.tapstore.validate import validate_store
from qwen3dbg.util.errors import UserError


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
    return taps | {
        n.replace("attn_scores", "attn_probs"): torch.softmax(t.float(), -1)
        for n, t in taps.items()
        if n.endswith("attn_scores")
    }


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
    result = run_diff("scratch", f"store:{out}", model_dir=dense)  # scratch rounds as HF does, bit for bit
    assert result.first_divergence is None and result.exit_code == 0


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


@pytest.fixture(scope="module")
def c_writer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("c_writer")
    subprocess.run(
        [
            compiler("cc"),
            "-std=c99",
            "-O1",
            *C_FLAGS,
            "-I",
            str(C_DIR),
            "-o",
            str(d / "w"),
            str(Path(__file__).with_name("store_holder.c")),
        ],
        check=True,
    )
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
        return cli(
            "capture",
            "--impl",
            "scratch",
            "--model",
            dense,
            "--token-ids",
            ids,
            "--taps",
            "embed",
            "--out",
            out,
            *extra,
        )

    assert run("5,17") == 0
    first = _snapshot(out)
    assert run("5,17") == 2 and "pass --replace" in capsys.readouterr().err
    assert _snapshot(out) == first
    assert run("9", "--replace") == 0
    assert TapStore.open(out).steps[0].token_ids == [[9]]


# ---- manifests and step files from strangers ------------------------------------------------------


@pytest.fixture(scope="module")
def valid_store(dense, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("valid") / "store"
    capture(Qwen3Reference(dense, "float32"), forced_steps([5, 17, 99], [42]), out)
    return out


def _copy(store: Path, to: Path) -> Path:
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(store, to)
    return to


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _set_manifest(store: Path, m: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(m))


def _outcome(store: Path, config=None):
    """validate_store's problems, or the UserError that says the store is unreadable: nothing else."""
    try:
        return validate_store(store, config)
    except UserError as e:
        return e


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["format", "dtype", "batch", "complete", "missing_taps", "taps", "config", "steps"]
STEP_FIELDS = ["step", "token_ids", "positions", "missing"]
adversarial = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@adversarial
@given(field=st.sampled_from(FIELDS + STEP_FIELDS), value=json_values, step=st.integers(0, 1))
def test_any_value_in_any_manifest_field_is_a_problem_or_unreadable_never_a_crash(
    tmp_path, valid_store, field, value, step
):
    store = _copy(valid_store, tmp_path / "s")
    m = _manifest(store)
    (m if field in FIELDS else m["steps"][step])[field] = value
    _set_manifest(store, m)
    outcome = _outcome(store)
    assert isinstance(outcome, (UserError, list))
    if outcome == []:  # what validates, opens and reads
        opened = TapStore.open(store)
        assert all(opened.has(s.step, "logits") for s in opened.steps)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(65, 200_000), where=st.sampled_from(["config", "steps", "missing_taps", "the document"]))
def test_deeply_nested_manifests_are_refused_in_one_sentence(tmp_path, valid_store, depth, where):
    store = _copy(valid_store, tmp_path / "s")
    nested = "[" * depth + "]" * depth
    text = json.dumps(_manifest(store) | ({where: 0} if where != "the document" else {}))
    text = text.replace(f'"{where}": 0', f'"{where}": {nested}') if where != "the document" else nested
    (store / "manifest.json").write_text(text)
    outcome = _outcome(store)
    assert isinstance(outcome, UserError) and "levels deep" in str(outcome)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.integers(4, 10**12), experts=st.none() | st.integers(10**6, 10**12))
def test_a_manifest_config_declaring_absurd_sizes_is_checked_against_the_files_first(
    tmp_path, valid_store, layers, experts
):
    """The taps the files hold are checked one by one; the taps the config declares are never listed
    in full (1e8 layers are 2.4e9 tap names), and a missing one ends the count."""
    import time
    import tracemalloc

    store = _copy(valid_store, tmp_path / "s")
    m = _manifest(store)
    m["config"] |= {"num_hidden_layers": layers} | ({"num_experts": experts} if experts else {})
    _set_manifest(store, m)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome = _outcome(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 20 and peak < 100 * 2**20
    assert isinstance(outcome, UserError) or any("lacks" in p.message for p in outcome)


@pytest.mark.parametrize("config", [[1, 2], "qwen3", 7, True, None])
def test_a_manifest_config_that_is_not_an_object_is_a_problem(tmp_path, valid_store, config):
    store = _copy(valid_store, tmp_path / "s")
    _set_manifest(store, _manifest(store) | {"config": config})
    problems = validate_store(store)
    assert (config is None) == (problems == []), problems
    if config is not None:
        assert "not an object" in problems[0].message


@adversarial
@given(
    drop=st.sets(
        st.sampled_from(
            [
                "embed",
                "logits",
                "final_norm",
                "layers.0.attn_probs",
                "layers.1.q_rope",
                "layers.2.mlp.act",
                "layers.2.resid_out",
            ]
        ),
        min_size=1,
    ),
    declare=st.sets(st.sampled_from(["embed", "logits", "final_norm", "attn_probs", "q_rope", "mlp.act", "resid_out"])),
    with_config=st.booleans(),
)
def test_a_tap_neither_present_nor_declared_missing_is_a_problem(
    tmp_path, valid_store, dense, drop, declare, with_config
):
    """With or without a config; without one, the layers are those the file holds (layer 2 keeps other
    taps) and a dense FFN tap cannot be asked for: the layer might be MoE."""
    from qwen3dbg.tapstore.schema import OPS_BY_NAME, parse_tap_name

    store = _copy(valid_store, tmp_path / "s")
    m = _manifest(store) | {"missing_taps": sorted(declare)}
    _set_manifest(store, m if with_config else {k: v for k, v in m.items() if k != "config"})
    _rewrite_taps(store, lambda step, taps: {n: t for n, t in taps.items() if n not in drop})
    undeclared = {
        n
        for n in drop
        if parse_tap_name(n)[1] not in declare and (with_config or OPS_BY_NAME[parse_tap_name(n)[1]].where == "all")
    }
    problems = validate_store(store, load_config(dense) if with_config else None)
    lacking = [p.message for p in problems if "lacks" in p.message]
    assert len(lacking) == (2 if undeclared else 0), problems  # in both steps
    assert all(f"lacks {len(undeclared)} taps" in msg for msg in lacking)


@pytest.mark.parametrize("every_op_declared", [False, True])
def test_a_store_without_any_tap_is_refused_or_judges_nothing(tmp_path, valid_store, dense, every_op_declared, capsys):
    from qwen3dbg.tapstore.schema import OPS_BY_NAME

    store = _copy(valid_store, tmp_path / "s")
    _rewrite_taps(store, lambda step, taps: {})
    if every_op_declared:
        _set_manifest(store, _manifest(store) | {"missing_taps": sorted(OPS_BY_NAME)})
    assert (validate_store(store, load_config(dense)) == []) == every_op_declared
    assert cli("diff", "--ref", "scratch", "--cand", f"store:{store}", "--model", dense) == 2
    said = capsys.readouterr()
    assert ("no tap was compared" if every_op_declared else "lacks") in said.out + said.err


bad_ids = st.integers(-(2**70), -1) | st.integers(512, 2**70)


@adversarial
@given(bad=bad_ids, at=st.integers(0, 3), with_config=st.booleans())
def test_token_ids_outside_the_vocabulary_are_problems_with_or_without_a_config(
    tmp_path, valid_store, bad, at, with_config
):
    store = _copy(valid_store, tmp_path / "s")
    m = _manifest(store)
    if not with_config:
        del m["config"]
    step = m["steps"][min(at, 3) // 3]
    step["token_ids"][0][min(at, len(step["token_ids"][0]) - 1)] = bad
    _set_manifest(store, m)
    problems = validate_store(store)
    assert any("outside" in p.message for p in problems), problems


@pytest.mark.parametrize("bad", [-1, 512, 2**63, 10**30])
def test_diff_refuses_a_store_whose_ids_are_outside_the_vocabulary_of_its_model(
    tmp_path, valid_store, dense, bad, capsys
):
    store = _copy(valid_store, tmp_path / "s")
    m = _manifest(store)
    del m["config"]
    m["steps"][0]["token_ids"][0][1] = bad
    _set_manifest(store, m)
    _rewrite_taps(store, lambda step, taps: {n: t for n, t in taps.items() if n != "logits"})
    _set_manifest(store, _manifest(store) | {"missing_taps": ["logits"]})
    assert cli("diff", "--ref", "scratch", "--cand", f"store:{store}", "--model", dense) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
