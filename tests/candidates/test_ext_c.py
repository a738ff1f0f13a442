"""The C tap writer (candidates/c/qwen3dbg_taps.h), the example C engine and `validate-store`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import C_DIR, C_FLAGS, DECODE, PROMPT, compiler, edit_safetensors_header, first_divergence
from typer.testing import CliRunner

from qwen3dbg.cli import app
from qwen3dbg.model.config import load_config
from qwen3dbg.tapstore.schema import step_taps
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.tapstore.validate import validate_store
from qwen3dbg.util.errors import UserError


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    """The example engine built clean and with its planted RoPE bug."""
    cc, out = compiler("cc"), tmp_path_factory.mktemp("bin")
    built = {}
    for kind, extra in (("clean", []), ("rope_bug", ["-DPLANT_ROPE_BUG"])):
        built[kind] = out / f"engine_{kind}"
        subprocess.run(
            [cc, "-std=c99", "-O2", *C_FLAGS, *extra, "-o", str(built[kind]), str(C_DIR / "example_engine.c"), "-lm"],
            check=True,
        )
    return built


def run_engine(engine: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(engine), str(model), str(out), ",".join(map(str, PROMPT)), "--decode", ",".join(map(str, DECODE)), *extra],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("lang,std", [("c", "-std=c99"), ("c++", "-std=c++11")])
@pytest.mark.parametrize("implementation", [False, True])
def test_header_compiles_alone_warning_free(tmp_path, lang, std, implementation):
    src = tmp_path / "only.c"
    src.write_text(
        ("#define QWEN3DBG_TAPS_IMPLEMENTATION\n" if implementation else "") + '#include "qwen3dbg_taps.h"\n'
    )
    cc = compiler("cc" if lang == "c" else "c++")
    subprocess.run(
        [cc, "-x", lang, std, "-O2", *C_FLAGS, "-I", str(C_DIR), "-c", str(src), "-o", str(tmp_path / "only.o")],
        check=True,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point, so that user errors go through its exit-2 boundary."""
    return subprocess.run(
        [sys.executable, "-c", "from qwen3dbg.cli import main; main()", *args], capture_output=True, text=True
    )


def test_clean_c_engine_writes_every_tap_and_agrees_with_the_reference(tmp_path, dense, engines):
    out = tmp_path / "store"
    assert run_engine(engines["clean"], dense, out).returncode == 0
    assert validate_store(out, load_config(dense)) == []
    store = TapStore.open(out)
    assert [s.token_ids for s in store.steps] == [[PROMPT]] + [[[t]] for t in DECODE]
    assert set(store.names(0)) == {t.name for t in step_taps(load_config(dense), 1, len(PROMPT), len(PROMPT))}
    assert first_divergence(dense, f"store:{out}") is None


def test_planted_rope_bug_is_localized_to_the_first_rope_tap(tmp_path, dense, engines):
    out = tmp_path / "store"
    assert run_engine(engines["rope_bug"], dense, out).returncode == 0
    result = run_cli(
        "diff", "--ref", "hf", "--cand", f"store:{out}", "--model", str(dense), "--json", str(tmp_path / "diff.json")
    )
    assert result.returncode == 1, result.stderr
    first = json.loads((tmp_path / "diff.json").read_text())["first_divergence"]
    assert (first["step"], first["tap"]) == (0, "layers.0.q_rope")


def test_taps_an_engine_declares_missing_are_listed_and_absent(tmp_path, dense, engines):
    out = tmp_path / "store"
    assert run_engine(engines["clean"], dense, out, "--no-attention-matrices", "1").returncode == 0
    store = TapStore.open(out)
    assert sorted(store.missing_taps) == ["attn_probs", "attn_scores"]
    assert not any(n.endswith(("attn_scores", "attn_probs")) for n in store.names(0))
    assert validate_store(out, load_config(dense)) == []


def test_crash_mid_run_leaves_a_store_that_is_refused(tmp_path, dense, engines):
    out = tmp_path / "store"
    assert run_engine(engines["clean"], dense, out, "--crash-after", "1").returncode != 0
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    problems = validate_store(out)
    assert len(problems) == 1 and "complete" in problems[0].message
    with pytest.raises(UserError, match="incomplete"):
        TapStore.open(out)
    result = CliRunner().invoke(app, ["validate-store", str(out)])
    assert result.exit_code == 1
    refused = run_cli("diff", "--cand", f"store:{out}", "--model", str(dense))
    assert refused.returncode == 2 and "incomplete" in refused.stderr


@pytest.fixture()
def c_store(tmp_path, dense, engines) -> Path:
    out = tmp_path / "store"
    assert run_engine(engines["clean"], dense, out).returncode == 0
    return out


def _edit_manifest(store: Path, edit) -> None:
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))


BREAKAGES = {
    "a step file deleted": (lambda s: (s / "step_0001.safetensors").unlink(), "step_0001.safetensors is missing"),
    "a step file truncated": (lambda s: _truncate(s / "step_0002.safetensors"), "truncated"),
    "a position gap": (lambda s: _edit_manifest(s, lambda m: m["steps"][1].update(positions=[[20]])), "positions"),
    "a token id outside the vocabulary": (
        lambda s: _edit_manifest(s, lambda m: m["steps"][0]["token_ids"][0].__setitem__(0, 10**6)),
        "vocabulary",
    ),
    "steps out of order": (lambda s: _edit_manifest(s, lambda m: m["steps"][2].update(step=5)), "numbered"),
    "an integer float tap": (
        lambda s: edit_safetensors_header(s / "step_0000.safetensors", lambda h: h["embed"].update(dtype="I32") or h),
        "has dtype int32",
    ),
    "a config of another shape": (lambda s: _edit_manifest(s, lambda m: m["config"].update(head_dim=16)), "head_dim"),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_validate_store_explains_each_broken_rule(c_store, dense, breakage):
    breaker, expected = BREAKAGES[breakage]
    breaker(c_store)
    result = CliRunner().invoke(app, ["validate-store", str(c_store), "--model", str(dense)])
    assert result.exit_code == 1, result.output
    assert expected in result.output


def test_validate_store_without_a_manifest_is_unreadable(tmp_path):
    result = run_cli("validate-store", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json" in result.stderr


def test_validate_store_with_a_half_written_manifest_is_unreadable(c_store):
    (c_store / "manifest.json").write_text('{"format": "qwen3dbg-taps/1", "steps": [')
    result = run_cli("validate-store", str(c_store))
    assert result.returncode == 2 and "not valid JSON" in result.stderr


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_validate_store_accepts_python_captures(tmp_path, models, steps, preset):
    from qwen3dbg.reference.qwen3 import Qwen3Reference

    from qwen3dbg.run.capture import capture

    capture(Qwen3Reference(models(preset), "bfloat16"), steps, tmp_path / "store")
    assert validate_store(tmp_path / "store", load_config(models(preset))) == []
