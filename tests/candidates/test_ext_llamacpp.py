"""`--cand llamacpp:MODEL.gguf`: llama.cpp's graph nodes mapped to taps, against our reference."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import DECODE, PROMPT, first_divergence

from qwen3dbg.model.config import load_config
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.tapstore.validate import validate_store
from qwen3dbg.util.errors import UserError

STEPS = forced_steps(PROMPT, DECODE)

# Needs llama-cpp-python (`pip install '.[llamacpp]'` or .ci/install_llamacpp.sh): skipped without it, except
# under CI=true, where a missing build fails the run.
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None and os.environ.get("CI") != "true",
    reason="llama-cpp-python is not installed (pip install '.[llamacpp]' or .ci/install_llamacpp.sh)",
)


def gguf_of(model: Path, out: Path) -> Path:
    from qwen3dbg.model.gguf_io import write_gguf

    return write_gguf(model, out, gguf_type="f32")


@needs_llama
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_f32_gguf_in_llamacpp_matches_the_reference_within_the_noise_floor(tmp_path, models, preset):
    model = models(preset)
    gguf = gguf_of(model, tmp_path / "m.gguf")
    capture(load_candidate(f"llamacpp:{gguf}", model, "float32"), STEPS, tmp_path / "llama")
    assert validate_store(tmp_path / "llama", load_config(model)) == []
    assert TapStore.open(tmp_path / "llama").missing_taps == [], "llama.cpp's graph has a node for every tap"
    assert first_divergence(model, f"llamacpp:{gguf}", "float32") is None


@needs_llama
def test_gguf_converted_with_the_wrong_rope_theta_is_localized_to_q_rope(tmp_path, models):
    model = models("tiny-dense")
    wrong = tmp_path / "wrong-theta"
    shutil.copytree(model, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    gguf = gguf_of(wrong, tmp_path / "m.gguf")
    assert first_divergence(model, f"llamacpp:{gguf}", "float32") == "step 0: layers.0.q_rope"


def test_without_llama_cpp_python_the_candidate_says_how_to_install_it(tmp_path, models, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    model = models("tiny-dense")
    with pytest.raises(UserError, match=r"pip install '\.\[llamacpp\]'"):
        load_candidate(f"llamacpp:{gguf_of(model, tmp_path / 'm.gguf')}", model, "float32")


def test_a_gguf_of_another_model_is_refused(tmp_path, models):
    with pytest.raises(UserError, match="made from"):
        load_candidate(f"llamacpp:{gguf_of(models('tiny-moe'), tmp_path / 'm.gguf')}", models("tiny-dense"), "float32")


def fake_node(array, ggml_type: int):
    """A GGMLTensor describing a numpy array the way ggml would (ne/nb fastest first) and a tensor_get over it."""
    import ctypes

    import numpy as np
    from qwen3dbg.candidates.llamacpp import GGMLTensor

    t = GGMLTensor()
    t.type = ggml_type
    dims = list(array.shape[::-1]) + [1] * (4 - array.ndim)
    strides = list(array.strides[::-1]) + [array.strides[0] * array.shape[0]] * (4 - array.ndim)
    t.ne[:] = dims
    t.nb[:] = strides
    base = array.base if array.base is not None else array
    offset = array.__array_interface__["data"][0] - base.__array_interface__["data"][0]

    def tensor_get(_ptr, dst, start, size):
        raw = np.ascontiguousarray(base).view(np.uint8).reshape(-1)
        ctypes.memmove(dst, raw[offset + start :].ctypes.data, size)

    return t, tensor_get


def test_a_node_is_read_in_numpy_order_through_its_strides():
    import numpy as np
    from qwen3dbg.candidates.llamacpp import GGML_TYPE_F32, GGML_TYPE_I32, read_node

    full = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    view = full.transpose(1, 0, 2)  # non-contiguous, like a permuted ggml view
    t, get = fake_node(view, GGML_TYPE_F32)
    assert np.array_equal(read_node(t, 0, get).reshape(view.shape), view)
    ids = np.arange(24, dtype=np.int32).reshape(4, 6)[:, :2]  # top-k view of an argsort: [T, k] of [T, E]
    t, get = fake_node(ids, GGML_TYPE_I32)
    assert np.array_equal(read_node(t, 0, get).reshape(ids.shape), ids)


def test_attention_matrices_drop_the_cache_padding():
    import numpy as np
    from qwen3dbg.candidates.llamacpp import attention_matrix

    heads, tokens, padded, cache = 4, 3, 256, 10
    kq = np.random.default_rng(0).standard_normal((heads, tokens, padded)).astype(np.float32)
    out = attention_matrix(kq, heads, tokens, cache)
    assert out.shape == (1, heads, tokens, cache)
    assert np.array_equal(out[0], kq[:, :, :cache])


@needs_llama
def test_llamacpp_renormalising_qwen3moe_expert_weights_is_localized_to_topk_weights(tmp_path, models):
    """llama.cpp's qwen3moe graph renormalises the top-k weights whatever the GGUF's expert_weights_norm says
    (checked on 0.3.36), so a norm_topk_prob=false model parts from transformers exactly there."""
    model = models("tiny-moe-nonorm")
    gguf = gguf_of(model, tmp_path / "m.gguf")
    found = first_divergence(model, f"llamacpp:{gguf}", "float32")
    assert found is not None, "llama.cpp now honours expert_weights_norm = false: drop this test"
    assert found == "step 0: layers.0.moe.topk_weights"


def test_a_damaged_gguf_is_one_clear_error(tmp_path, models):
    path = gguf_of(models("tiny-dense"), tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable GGUF"):
        load_candidate(f"llamacpp:{path}", models("tiny-dense"), "float32")


@needs_llama
def test_a_forward_hands_each_layer_on_as_computed_so_held_memory_does_not_grow_with_the_layers(tmp_path):
    """The sink drops every tap, so what is traced at its peak is what the candidate itself holds: with four
    times the layers (four times the tap bytes of a forward) it holds no more."""
    import tracemalloc

    import torch

    from qwen3dbg.model.synth import make_model

    class Counting:
        def __init__(self):
            self.total = 0

        def wants(self, name):
            return True

        def __call__(self, name, t):
            self.total += t.nbytes

    held, total = {}, {}
    info = forced_steps(list(range(1, 200)), [])[0]
    for layers in (2, 8):
        model = make_model(tmp_path / f"m{layers}", "tiny-dense", overrides={"num_hidden_layers": layers})
        cand = load_candidate(f"llamacpp:{gguf_of(model, tmp_path / f'm{layers}.gguf')}", model, "float32")
        cand.reset()
        sink = Counting()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        held[layers] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        total[layers] = sink.total
    assert total[8] > 3 * total[2]
    assert held[8] < 1.5 * held[2], (held, total)
