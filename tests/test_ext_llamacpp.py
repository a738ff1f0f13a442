"""`--cand llamacpp:MODEL.gguf`: llama.cpp's graph nodes mapped to taps, against our reference.

Needs llama-cpp-python (`pip install '.[llamacpp]'` or .ci/install_llamacpp.sh): skipped without it,
except under CI=true, where a missing build fails the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import divergent_taps, reference_stores
from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.config import load_config
from qwen3dbg.errors import UserError
from qwen3dbg.registry import load_candidate
from qwen3dbg.store import TapStore
from qwen3dbg.validate import validate_store

STEPS = forced_steps([9, 41, 7, 300, 12, 5, 77], [150, 3])

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None and os.environ.get("CI") != "true",
    reason="llama-cpp-python is not installed (pip install '.[llamacpp]' or .ci/install_llamacpp.sh)")


def gguf_of(model: Path, out: Path) -> Path:
    from qwen3dbg.gguf_io import write_gguf

    return write_gguf(model, out, gguf_type="f32")


def capture_llamacpp(gguf: Path, model: Path, out: Path) -> TapStore:
    capture(load_candidate(f"llamacpp:{gguf}", model, "float32"), STEPS, out)
    return TapStore.open(out)


@needs_llama
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_f32_gguf_in_llamacpp_matches_the_reference_within_the_noise_floor(tmp_path, models, preset):
    model = models(preset)
    store = capture_llamacpp(gguf_of(model, tmp_path / "m.gguf"), model, tmp_path / "llama")
    assert validate_store(tmp_path / "llama", load_config(model)) == []
    assert sorted(store.missing_taps) == ["k_cache", "v_cache"]
    golden, ref = reference_stores(model, STEPS, "float32", tmp_path)
    assert divergent_taps(store, golden, ref, load_config(model)) == []


@needs_llama
def test_gguf_converted_with_the_wrong_rope_theta_is_localized_to_q_rope(tmp_path, models):
    model = models("tiny-dense")
    wrong = tmp_path / "wrong-theta"
    shutil.copytree(model, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    store = capture_llamacpp(gguf_of(wrong, tmp_path / "m.gguf"), model, tmp_path / "llama")
    golden, ref = reference_stores(model, STEPS, "float32", tmp_path)
    found = divergent_taps(store, golden, ref, load_config(model))
    assert found[0][:2] == (0, "layers.0.q_rope")


def test_without_llama_cpp_python_the_candidate_says_how_to_install_it(tmp_path, models, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    model = models("tiny-dense")
    with pytest.raises(UserError, match=r"pip install 'qwen3dbg\[llamacpp\]'"):
        load_candidate(f"llamacpp:{gguf_of(model, tmp_path / 'm.gguf')}", model, "float32")


def test_a_gguf_of_another_model_is_refused(tmp_path, models):
    with pytest.raises(UserError, match="made from"):
        load_candidate(f"llamacpp:{gguf_of(models('tiny-moe'), tmp_path / 'm.gguf')}", models("tiny-dense"), "float32")
