"""The references agree with transformers: every tap present with the right shape, fp64 vs HF fp32
within fp32 rounding, and scratch vs HF eager bit for bit. CI runs this file again under the oldest
transformers we accept, whose bf16 MoE mixture rounds otherwise (there: within the differ's noise)."""

import pytest
import torch
from helpers import DECODE, PROMPT

from qwen3dbg.run.capture import run_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.schema import forward_index, step_taps

FP32_ROUNDINGS = 64  # a tap of a 3-layer model is a few dozen roundings deep


def _specs(cfg, steps):
    cache = 0
    for s, info in enumerate(steps):
        cache += info.tokens
        for spec in step_taps(cfg, 1, info.tokens, cache):
            yield s, spec


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
        elif spec.op == "moe.topk_weights" and impl == "hf":  # kept as computed: float32 before 5.6
            assert t.dtype in (cand.dtype, torch.float32)
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


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-moe-nonorm"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_scratch_equals_hf_eager_bit_for_bit(models, steps, preset, dtype):
    """Every tap of every step, where transformers mixes experts in the model dtype (since 5.6). Before,
    it keeps the router's top-k weights in float32 and mixes in float32: then every tap before the
    first MoE layer's mlp.out is still bit for bit, and the rest within the differ's noise."""
    scratch = run_steps(load_candidate("scratch", models(preset), dtype), steps)
    cand = load_candidate("hf", models(preset), dtype)
    hf = run_steps(cand, steps)
    order = forward_index(cand.config)
    differing = sorted(
        {
            name
            for s in range(len(steps))
            for name in hf[s]
            if not torch.equal(scratch[s][name], hf[s][name].to(scratch[s][name].dtype))
        },
        key=order.get,
    )
    wide_router = sorted(
        (n for n, t in hf[0].items() if n.endswith("topk_weights") and t.dtype != cand.dtype), key=order.get
    )
    if not wide_router:
        assert differing == []
        return
    from qwen3dbg.diff import run_diff

    assert order[differing[0]] >= order[wide_router[0].replace("moe.topk_weights", "mlp.out")]
    assert (
        run_diff(
            "scratch", "hf", model_dir=models(preset), dtype=dtype, token_ids=PROMPT, decode_ids=DECODE
        ).first_divergence
        is None
    )


def test_teacher_forced_layer_reproduces_the_full_run(models, steps):
    """run_layer on a layer's recorded input and cache gives that layer's recorded output."""
    from qwen3dbg.run.candidate import DictSink

    cand = load_candidate("scratch", models("tiny-dense"), "float32")
    taps = run_steps(cand, steps)
    prefix = steps[0].tokens
    past = (taps[0]["layers.1.k_cache"][:, :, :prefix], taps[0]["layers.1.v_cache"][:, :, :prefix])
    sink = DictSink()
    out = cand.run_layer(1, taps[1]["layers.0.resid_out"], torch.tensor(steps[1].positions), past, sink)
    assert torch.equal(out, taps[1]["layers.1.resid_out"])
    assert torch.equal(sink.taps["layers.1.attn_probs"], taps[1]["layers.1.attn_probs"])


def test_hf_hands_on_each_layers_cache_before_its_attention_matrices(models):
    """In the schema's order, so a diff's comparison, waiting for the cache, never sets a prefill's attention
    matrices aside (they would count against the side's byte bound)."""
    cand = load_candidate("hf", models("tiny-dense"), "float32")
    order = []

    class Recording:
        def wants(self, name):
            return True

        def __call__(self, name, t):
            order.append(name)

    cand.step(torch.tensor([PROMPT]), torch.tensor([list(range(len(PROMPT)))]), Recording())
    for i in range(cand.config.num_hidden_layers):
        at = {op: order.index(f"layers.{i}.{op}") for op in ("k_rope", "k_cache", "v_cache", "attn_scores")}
        assert at["k_rope"] < at["k_cache"] < at["v_cache"] < at["attn_scores"], at


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("path", ["softmax input", "computed again"])
def test_hfs_attention_scores_are_its_queries_times_its_keys_masked(models, steps, monkeypatch, preset, path):
    """HF's eager attention does not return its scores: they are its softmax's input, or, where a transformers
    calls no `nn.functional.softmax` there, the same ops again. Either way: q_rope . k_cache^T / sqrt(D) in
    the model's dtype, -inf where the causal mask hides a key, at the prefill and a decode step."""
    import types

    cand = load_candidate("hf", models(preset), "bfloat16")
    if path == "computed again":
        functional = types.SimpleNamespace(**vars(torch.nn.functional))  # its softmax is out of capture's reach
        monkeypatch.setattr(cand.modeling, "nn", types.SimpleNamespace(**{**vars(torch.nn), "functional": functional}))
    calls, repeat_kv = [], cand.modeling.repeat_kv
    monkeypatch.setattr(cand.modeling, "repeat_kv", lambda *a: calls.append(1) or repeat_kv(*a))
    taps = run_steps(cand, steps)
    cfg = cand.config
    per_layer = 2 if path == "softmax input" else 3  # eager's keys and values, and the scores' keys again
    assert len(calls) == per_layer * cfg.num_hidden_layers * len(steps)
    for s, info in enumerate(steps):
        for i in range(cfg.num_hidden_layers):
            q, k = taps[s][f"layers.{i}.q_rope"].transpose(1, 2), taps[s][f"layers.{i}.k_cache"]
            k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
            want = torch.matmul(q, k.transpose(2, 3)) * cfg.head_dim**-0.5
            first = info.positions[0][0]
            hidden = torch.arange(k.shape[2])[None, :] > first + torch.arange(q.shape[2])[:, None]
            want = want.masked_fill(hidden, float("-inf"))
            assert torch.equal(taps[s][f"layers.{i}.attn_scores"], want), (s, i)
