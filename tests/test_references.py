"""The references agree with transformers: every tap present with the right shape, fp64 vs HF fp32
within fp32 rounding, and scratch vs HF eager bit for bit (or one ulp) in bf16."""

import pytest
import torch

from qwen3dbg.capture import run_steps
from qwen3dbg.registry import load_candidate
from qwen3dbg.taps import step_taps

FP32_ROUNDINGS = 64  # a tap of a 3-layer model is a few dozen roundings deep


def _specs(cfg, steps):
    cache = 0
    for s, info in enumerate(steps):
        cache += info.tokens
        for spec in step_taps(cfg, 1, info.tokens, cache):
            yield s, spec


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at each element's magnitude."""
    eps = torch.finfo(x.dtype).eps
    mag = x.double().abs().clamp_min(torch.finfo(x.dtype).tiny)
    return eps * torch.exp2(torch.floor(torch.log2(mag)))


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-moe-nonorm"])
@pytest.mark.parametrize("impl, dtype", [("hf", "float32"), ("scratch", "bfloat16"), ("hf", "bfloat16")])
def test_every_tap_present_with_schema_shape_and_impl_dtype(models, steps, preset, impl, dtype):
    cand = load_candidate(impl, models(preset), dtype)
    taps = run_steps(cand, steps)
    for s, spec in _specs(cand.config, steps):
        t = taps[s][spec.name]
        assert tuple(t.shape) == spec.shape, (s, spec.name)
        if spec.integer:
            assert t.dtype in (torch.int64, torch.int32)
        else:
            assert t.dtype == cand.dtype, (spec.name, t.dtype)
    assert len(taps[1]) == len(list(step_taps(cand.config, 1, 1, 1)))


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fp64_reference_matches_hf_fp32_within_fp32_rounding(models, steps, preset):
    gold = run_steps(load_candidate("scratch", models(preset), "float64"), steps)
    cand = load_candidate("hf", models(preset), "float32")
    hf = run_steps(cand, steps)
    bound = FP32_ROUNDINGS * torch.finfo(torch.float32).eps
    for s, spec in _specs(cand.config, steps):
        g, h = gold[s][spec.name], hf[s][spec.name]
        if spec.integer:
            assert torch.equal(g.long(), h.long()), spec.name
            continue
        assert g.dtype == torch.float64
        fin = torch.isfinite(g)
        assert torch.equal(fin, torch.isfinite(h)), spec.name  # the same masked entries
        err = (h.double() - g)[fin].norm() / g[fin].norm().clamp_min(1e-300)
        assert err <= bound, f"step {s} {spec.name}: {err / torch.finfo(torch.float32).eps:.1f} eps"


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("attn_dtype", ["bfloat16", "float32"])
def test_scratch_equals_hf_eager_bit_for_bit_or_within_one_ulp(models, steps, preset, attn_dtype):
    scratch = run_steps(load_candidate("scratch", models(preset), attn_dtype), steps)
    cand = load_candidate("hf", models(preset), attn_dtype)
    hf = run_steps(cand, steps)
    identical = total = 0
    for s, spec in _specs(cand.config, steps):
        a, b = scratch[s][spec.name], hf[s][spec.name]
        if spec.integer:
            assert torch.equal(a.long(), b.long()), spec.name
            continue
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), spec.name
        diff = (a.double() - b.double()).abs()[fin]
        assert (diff <= _ulp(b)[fin]).all(), f"step {s} {spec.name}: more than one ulp apart"
        identical += int(torch.equal(a[fin], b[fin]))
        total += 1
    assert identical / total > 0.9  # one-ulp slack is for matmul accumulation order only


def test_teacher_forced_layer_reproduces_the_full_run(models, steps):
    """run_layer on a layer's recorded input and cache gives that layer's recorded output."""
    from qwen3dbg.candidate import DictSink

    cand = load_candidate("scratch", models("tiny-dense"), "float32")
    taps = run_steps(cand, steps)
    prefix = steps[0].tokens
    past = (taps[0]["layers.1.k_cache"][:, :, :prefix], taps[0]["layers.1.v_cache"][:, :, :prefix])
    sink = DictSink()
    out = cand.run_layer(1, taps[1]["layers.0.resid_out"], torch.tensor(steps[1].positions), past, sink)
    assert torch.equal(out, taps[1]["layers.1.resid_out"])
    assert torch.equal(sink.taps["layers.1.attn_probs"], taps[1]["layers.1.attn_probs"])
