"""The CPU twin of `mine` against the references: fp64 golden in fp32, HF eager bit for bit in bf16,
and the numerics switches moving the taps they name. Every test runs prefill and decode steps."""

from __future__ import annotations

import pytest
import torch
from helpers import DECODE, PROMPT
from qwen3dbg.reference.qwen3 import Qwen3Reference

from qwen3dbg.diff.metrics import ulps_apart
from qwen3dbg.model.synth import Plants, make_model
from qwen3dbg.run.candidate import DictSink
from qwen3dbg.run.capture import capture, forced_steps, run_steps
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.util.errors import UserError

STEPS = forced_steps(PROMPT, DECODE)  # prefill + 3 decode steps


def mine(model_dir, dtype, **options):
    """The engine as every side loads it: its check, then the engine (the constructor alone checks nothing)."""
    from qwen3dbg.run.registry import load_candidate

    return load_candidate("mine", model_dir, dtype, **{"device": "cpu", **options})


def run(cand) -> list[dict[str, torch.Tensor]]:
    return run_steps(cand, STEPS)


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |t - ref| where ref is finite; masked scores must be masked on both sides."""
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(t.double())), "masked (-inf) entries differ"
    return (t.double() - ref.double())[finite].abs().max().item() if finite.any() else 0.0


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def model_dir(request, models):
    return models(request.param)


@pytest.fixture(scope="module")
def golden(model_dir):
    return run(Qwen3Reference(model_dir, "float64"))


def test_fp32_twin_matches_fp64_golden_within_fp32_rounding(model_dir, golden):
    """In fp32 every tap is within twice the fp32 reference's own error from the fp64 golden, that error
    counted as at least two fp32 ulps of the tap's scale (a tap of two values can be lucky for the
    reference); router picks are identical."""
    ours, theirs = run(mine(model_dir, "float32")), run(Qwen3Reference(model_dir, "float32"))
    eps = torch.finfo(torch.float32).eps
    for step, (gold, got, ref32) in enumerate(zip(golden, ours, theirs)):
        assert set(got) == set(gold), f"step {step}: taps differ from the schema's"
        for name, g in gold.items():
            if not g.is_floating_point():
                assert torch.equal(got[name], g), f"step {step} {name}"
                continue
            scale = g[torch.isfinite(g)].abs().max().item()
            bound = 2 * (max_err(ref32[name], g) + 2 * eps * scale)
            assert max_err(got[name], g) <= bound, f"step {step} {name}"


def assert_equal_until_a_one_ulp_difference(ours, ref) -> None:
    """Taps equal `ref`'s bit for bit until the first one where an fp32 accumulation order or a libm exp
    differs, and that one is at most one ulp off (later taps inherit it, through the cache too)."""
    for step, (got, want) in enumerate(zip(ours, ref)):
        for name, w in want.items():
            if not w.is_floating_point():
                assert torch.equal(got[name], w), f"step {step} {name}"
                continue
            apart = ulps_apart(got[name], w.to(got[name].dtype))
            if apart:
                assert apart == 1, f"step {step}: first differing tap {name} is {apart} ulps off"
                return


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_twin_rounds_where_the_reference_rounds(model_dir, dtype):
    """With default switches, against scratch (bit-identical to HF eager in these dtypes)."""
    assert_equal_until_a_one_ulp_difference(run(mine(model_dir, dtype)), run(Qwen3Reference(model_dir, dtype)))


def test_bf16_twin_rounds_where_hf_eager_rounds(models):
    from qwen3dbg.reference.hf import HFCandidate

    model_dir = models("tiny-dense")
    assert_equal_until_a_one_ulp_difference(run(mine(model_dir, "bfloat16")), run(HFCandidate(model_dir, "bfloat16")))


@pytest.fixture(scope="module")
def big_k_norm(models):
    """tiny-dense with k_norm weights of ~96.5 in layer 0, as in the released Qwen3."""
    return models("big-k-norm")


def exact_k_norm(taps: dict[str, torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer 0's k_norm in float64 from the step's own k_proj tap [B,T,nKV*D]."""
    k = taps["layers.0.k_proj"].double()
    k = k.view(*k.shape[:2], -1, weight.numel())
    return weight.double() * k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)


def test_fused_rmsnorm_rounds_k_norm_correctly_where_hf_order_does_not(big_k_norm):
    """Rounding the normalised k before a ~96.5 weight multiplies it costs up to 96.5 of its half-ulps:
    the HF order lands more than half an ulp from the exact norm, fused rounds once and never does.
    Judged against the exact norm (fp64) of each run's own k_proj tap."""
    from qwen3dbg.model.checkpoint import Checkpoint

    weight = Checkpoint(big_k_norm).get("model.layers.0.self_attn.k_norm.weight")
    hf_order, fused = mine(big_k_norm, "bfloat16"), mine(big_k_norm, "bfloat16", rmsnorm="fused")
    eps = hf_order.config.rms_norm_eps
    hf_taps, fused_taps = run(hf_order), run(fused)
    assert torch.equal(hf_taps[0]["embed"], fused_taps[0]["embed"])

    def ulps_from_exact(taps):
        exact = exact_k_norm(taps, weight, eps)
        return ((taps["layers.0.k_norm"].double() - exact).abs() / bf16_ulp(exact)).max().item()

    # fp32 normalisation leaves ~1e-7 relative: far below the slack of 1% of an ulp
    assert max(ulps_from_exact(t) for t in fused_taps) <= 0.51
    assert max(ulps_from_exact(t) for t in hf_taps) > 0.51


def mean_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return (t.double() - ref).abs().mean().item()


def test_compute_dtype_accumulation_loses_accuracy_in_the_products(model_dir, golden):
    default, low = run(mine(model_dir, "bfloat16")), run(mine(model_dir, "bfloat16", accum="compute"))
    assert torch.equal(default[0]["layers.0.attn_norm"], low[0]["layers.0.attn_norm"]), "no product before it"
    g = golden[0]["layers.0.q_proj"]
    assert mean_err(low[0]["layers.0.q_proj"], g) > mean_err(default[0]["layers.0.q_proj"], g)


def test_split_accumulation_changes_the_products_only_from_the_first_product_on(model_dir):
    default, split = run(mine(model_dir, "bfloat16")), run(mine(model_dir, "bfloat16", accum="split"))
    assert torch.equal(default[0]["layers.0.attn_norm"], split[0]["layers.0.attn_norm"])
    assert not torch.equal(default[0]["layers.0.q_proj"], split[0]["layers.0.q_proj"])


def exact_probs(taps: dict[str, torch.Tensor], layer: int, n_rep: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) in float64 from the step's own q_rope [B,T,nH,D] and k_cache [B,nKV,S,D]."""
    q = taps[f"layers.{layer}.q_rope"].double().transpose(1, 2)
    k = taps[f"layers.{layer}.k_cache"].double().repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
    T, S = scores.shape[-2:]
    causal = torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1)


def test_fp32_scores_change_only_the_attention_and_bring_it_closer_to_exact(model_dir):
    """scores=fp32 skips two bf16 roundings of the scores: same inputs, probabilities nearer the exact
    softmax of those very inputs."""
    default, wide = run(mine(model_dir, "bfloat16")), run(mine(model_dir, "bfloat16", scores="fp32"))
    n_rep = mine(model_dir, "bfloat16").config.n_rep
    assert torch.equal(default[0]["layers.0.q_rope"], wide[0]["layers.0.q_rope"])
    assert not torch.equal(default[0]["layers.0.attn_probs"], wide[0]["layers.0.attn_probs"])
    exact = exact_probs(default[0], 0, n_rep)
    assert mean_err(wide[0]["layers.0.attn_probs"], exact) < mean_err(default[0]["layers.0.attn_probs"], exact)


def test_capture_writes_every_planned_tap_and_the_manifest_says_the_device(tmp_path, models):
    model_dir = models("tiny-moe")
    store = TapStore.open(capture(mine(model_dir, "bfloat16"), STEPS, tmp_path / "store"))
    assert store.manifest["device"] == "cpu"
    assert all("missing" not in s for s in store.manifest["steps"])


def test_stray_tensors_on_disk_are_ignored(tmp_path, models):
    """Biases the config does not declare (attention_bias false) must not be read, however huge."""
    ghost = make_model(tmp_path / "ghost", "tiny-dense", plants=Plants(ghost_bias=1e30))
    clean = models("tiny-dense")
    assert torch.equal(run(mine(ghost, "bfloat16"))[-1]["logits"], run(mine(clean, "bfloat16"))[-1]["logits"])


@pytest.mark.parametrize(
    "options",
    [
        {"rmsnorm": "late"},
        {"accum": "bf17"},
        {"device": "tpu"},
        {"max_seq": "many"},
        {"max_seq": "-5"},
        {"max_seq": "0"},
        {"pdl": "bogus"},
        {"graph": "maybe"},
    ],
)
def test_bad_options_are_user_errors(options, models):
    with pytest.raises(UserError):
        mine(models("tiny-dense"), "bfloat16", **options)


def test_float64_is_refused_with_a_pointer_to_the_golden(models):
    with pytest.raises(UserError, match="scratch"):
        mine(models("tiny-dense"), "float64")


def test_positions_that_skip_cache_slots_are_refused(models):
    cand = mine(models("tiny-dense"), "bfloat16")
    with pytest.raises(UserError, match="positions"):
        cand.step(torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), DictSink())


def test_more_positions_than_the_model_has_name_the_model_limit_not_the_cache(tmp_path):
    """max_seq is capped at max_position_embeddings: advice to raise it could not be followed."""
    short = make_model(tmp_path / "short", "tiny-dense", overrides={"max_position_embeddings": 8})
    cand = mine(short, "bfloat16", max_seq="40")
    with pytest.raises(UserError, match="max_position_embeddings"):
        cand.step(torch.arange(10)[None], torch.arange(10)[None], DictSink())


def test_one_layer_run_alone_reproduces_that_layer_of_the_full_step(models):
    """Teacher forcing: layer 1 fed the full run's layer-0 output and layer-1 cache gives its resid_out."""
    cand = mine(models("tiny-moe"), "bfloat16")
    taps = run(cand)
    info = STEPS[1]
    sink = DictSink()
    out = cand.run_layer(
        1,
        taps[1]["layers.0.resid_out"],
        torch.tensor(info.positions),
        (taps[0]["layers.1.k_cache"], taps[0]["layers.1.v_cache"]),
        sink,
    )
    assert torch.equal(out, taps[1]["layers.1.resid_out"])
    assert torch.equal(sink.taps["layers.1.attn_probs"], taps[1]["layers.1.attn_probs"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_accumulation_is_one_running_sum_rounded_after_every_add(dtype):
    """accum=compute answers "my loop accumulates in bf16": one sum over the whole row in ascending k,
    rounded to the dtype after each add (products of bf16/fp16 inputs are exact in fp32)."""
    from qwen3dbg.candidates.mine.build import load

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 584, generator=g).to(dtype), torch.randn(3, 584, generator=g).to(dtype)
    want = []
    for row in w:
        acc = torch.zeros((), dtype=torch.float32)
        for a, b in zip(x[0].float(), row.float()):
            acc = (acc + a * b).to(dtype).float()
        want.append(acc)
    y, none = torch.empty(1, 3, dtype=dtype), torch.empty(0, dtype=dtype)
    load().linear(x, w, y, 1, none, none)
    assert torch.equal(y[0], torch.stack(want).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("accum", [0, 1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_twin_gemm_sums_in_the_same_order_as_the_per_row_dot(rows, accum, dtype):
    """linear (lane-major, transposed with AVX2 where there is one) and moe_linear (one canonical dot per
    row) must agree bit for bit, with whole 256-element sweeps and a partial one: both stand for the
    same warp reduction."""
    from qwen3dbg.candidates.mine.build import load

    ops = load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 584, generator=g).to(dtype)
    w = torch.randn(5, 584, generator=g).to(dtype)
    y, y_ref, none = torch.empty(rows, 5, dtype=dtype), torch.empty(rows, 5, dtype=dtype), torch.empty(0, dtype=dtype)
    ops.linear(x, w, y, accum, none, none)
    ops.moe_linear(x, torch.zeros(rows, 1, dtype=torch.int64), w[None].contiguous(), y_ref, False, accum)
    assert torch.equal(y, y_ref)


def test_kernels_refuse_tensors_they_would_misread():
    """The kernels take raw pointers: a wrong dtype or a short buffer must be refused by name, not read."""
    from qwen3dbg.candidates.mine.build import load

    ops = load()
    x, w = torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16)
    none = torch.empty(0, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="Float tensor where BFloat16"):
        ops.linear(x.float(), w, torch.empty(2, 4, dtype=torch.bfloat16), 0, none, none)
    with pytest.raises(RuntimeError, match="where 2 x 4 are indexed"):
        ops.linear(x, w, torch.empty(2, 3, dtype=torch.bfloat16), 0, none, none)
    with pytest.raises(RuntimeError, match="resid_in and resid_out shaped like"):
        ops.linear(x, w, torch.empty(2, 4, dtype=torch.bfloat16), 0, none, torch.empty(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="Int tensor where Long"):
        ops.embed(torch.zeros(2, dtype=torch.int32), w, torch.empty(2, 16, dtype=torch.bfloat16))
    bf = dict(dtype=torch.bfloat16)
    q, cache, rope = torch.zeros(1, 2, 16, **bf), torch.zeros(1, 1, 1, 4, 8, **bf), torch.zeros(4, 16, **bf)
    with pytest.raises(RuntimeError, match="do not share"):  # heads of 16 dims, a cache of 8
        ops.attention(
            torch.zeros(1, 64, **bf),
            torch.ones(16, **bf),
            torch.ones(16, **bf),
            rope,
            rope,
            torch.zeros(1, dtype=torch.int32),
            q,
            torch.zeros(1, 1, 16, **bf),
            q,
            torch.zeros(1, 1, 16, **bf),
            cache,
            cache,
            torch.empty(1, 2, 1, 4),
            torch.empty(1, 2, 1, 4, **bf),
            torch.empty(1, 32, **bf),
            1,
            0,
            0,
            0.25,
            True,
            0,
            1e-6,
            0,
        )
