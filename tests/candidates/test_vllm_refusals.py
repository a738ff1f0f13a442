"""What `--cand vllm` refuses before vLLM loads (no vLLM needed: these run in the main suite), and the
diagnosis that names a float8 KV cache, shown on a tap store."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.diff import run_diff
from qwen3dbg.diff.diagnosis.recompute import float8
from qwen3dbg.util.errors import UserError
from qwen3dbg.run.registry import check_candidate, load_candidate
from qwen3dbg.model.synth import make_model


@pytest.fixture
def without_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


def test_without_vllm_one_sentence_names_the_install_script(models, without_vllm):
    with pytest.raises(UserError, match=r"\.ci/install_vllm\.sh") as e:
        check_candidate("vllm", models("tiny-dense"), "bfloat16")
    assert str(e.value).count(". ") == 0  # one sentence


def test_a_head_size_vllms_cpu_attention_lacks_is_refused(tmp_path):
    model = make_model(tmp_path / "m", "tiny-dense", overrides={"head_dim": 16})
    with pytest.raises(UserError, match="head_dim 32, 64.*this model has 16"):
        check_candidate("vllm", model, "bfloat16")


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prefix": "48"}, "multiple of block_size=128"),
        ({"block_size": "48"}, "multiples of 32"),
        ({"batch": "0"}, "at least 1"),
        ({"kv_cache_dtype": "int8"}, "choose one of auto, fp8"),
        ({"hf_overrides": "rope_theta"}, "key:value"),
        ({"patch": "no_such_patch.py"}, "no such file"),
        ({"chunks": "8"}, "has no option 'chunks'"),
        ({"dtype": "float16"}, "the run sets dtype for every side; give it with --dtype"),
        ({"speed": "fast"}, "speed='fast': choose true or false"),
        ({"speed": "on", "workers": "1"}, "speed=on times vLLM in this process, at tp=1"),
    ],
)
def test_options_are_checked_before_anything_loads(models, options, match):
    with pytest.raises(UserError, match=match):
        check_candidate("vllm", models("tiny-dense"), "bfloat16", **options)


@pytest.mark.parametrize(
    "tp,match",
    [
        ("two", "tp='two': give a whole number of at least 1"),
        ("0", "at least 1"),
        ("3", "tp=3: vLLM's CPU build runs one worker per rank on cores of its own, and 2 are available here"),
        ("workers=2", "workers=2: give 1"),
    ],
)
def test_a_tensor_parallel_size_the_machine_cannot_run_is_refused_in_one_sentence(models, monkeypatch, tp, match):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    key, _, value = tp.rpartition("=")
    with pytest.raises(UserError, match=match) as e:
        check_candidate("vllm", models("tiny-dense"), "bfloat16", **{key or "tp": value})
    assert str(e.value).count(". ") == 0


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(models, monkeypatch, without_vllm):
    """tiny-moe: 4 query heads, 2 kv heads, 8 experts of 48 columns; vLLM splits each evenly over the ranks."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    with pytest.raises(UserError, match=r"3 does not divide num_attention_heads=4, num_key_value_heads=2 \(nor"):
        check_candidate("vllm", models("tiny-moe"), "bfloat16", tp="3")
    with pytest.raises(UserError, match="needs vLLM's CPU build"):  # 4 q heads, each kv head on 2 ranks: past the check
        check_candidate("vllm", models("tiny-moe"), "bfloat16", tp="4")


@pytest.mark.parametrize("toward_zero", [False, True])
def test_a_cache_kept_in_float8_is_named_as_such(models, tmp_path, toward_zero):
    """A store whose layer-0 k_cache is its own k_rope rounded to float8 e4m3 (to nearest, or with the low bits
    dropped as vLLM's CPU cache writer does): the divergence is at the cache, and the diagnosis says how."""
    model = models("tiny-dense")
    store = capture(load_candidate("scratch", model, "bfloat16"), forced_steps(list(range(3, 43)), []), tmp_path / "s")
    taps = load_file(store / "step_0000.safetensors")
    k = taps["layers.0.k_rope"].transpose(1, 2)
    taps["layers.0.k_cache"] = float8(k, 3, -6, 448.0, toward_zero).to(torch.bfloat16).contiguous()
    save_file(taps, store / "step_0000.safetensors")
    r = run_diff("hf", f"store:{store}", model_dir=model)
    assert r.first_divergence.tap == "layers.0.k_cache"
    found = r.diagnosis[0]
    assert found.signature == "cache_lowp"
    assert found.evidence == found.evidence | {
        "format": "float8_e4m3",
        "rounding": "toward_zero" if toward_zero else "nearest",
    }


def test_float8_rounding_matches_torch_to_nearest_and_drops_bits_toward_zero():
    """On bfloat16 values (what a cache is written from; torch's cast from float64 rounds twice)."""
    x = torch.linspace(-500, 500, 20001)
    x = torch.cat([x, x * 1e-3, x * 1e-5]).to(torch.bfloat16)
    assert torch.equal(float8(x, 3, -6, 448.0, False), x.to(torch.float8_e4m3fn).double())
    assert torch.equal(float8(x, 2, -14, 57344.0, False), x.to(torch.float8_e5m2).double())
    down = float8(x, 3, -6, 448.0, True)
    assert bool((down.abs() <= x.double().abs()).all())  # toward zero ...
    assert torch.equal(down.to(torch.float8_e4m3fn).double(), down)  # ... onto the format's values
