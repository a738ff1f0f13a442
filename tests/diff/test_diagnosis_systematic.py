"""Below the noise: a shift every element shares is reported as a systematic finding (exit 0), and clean
pairs raise none. The false-alarm rate over 20 seeds is measured by bench/bench_systematic.py."""

from __future__ import annotations

import pytest
import torch
from qwen3dbg.candidates.planted import shifted

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.diagnosis.systematic import MIN_ROWS, detect, scored, sign_test, signed_stats
from qwen3dbg.diff.fused import tap_errors
from qwen3dbg.diff.result import TapResult
from qwen3dbg.diff.summary import summary
from qwen3dbg.model.config import load_config
from qwen3dbg.run.registry import IMPLEMENTATIONS

TOKENS = list(range(3, 3 + 160))  # 160 rows of 64: every hidden-state tap holds >= 1e4 elements


def _tap(name: str, g, r, c, dtype) -> TapResult:
    te = tap_errors(g, r, c, row=g.shape[-1])
    return TapResult(
        step=0,
        name=name,
        layer=None,
        op=name,
        status="ok",
        extra={"signed": signed_stats(te.rows[:4], te.count, te.gold_norm, dtype)},
    )


@pytest.mark.parametrize("shape", [(3, 1000, 77), (2, 151_936)], ids=["rows-across-chunks", "rows-longer-than-a-chunk"])
def test_the_comparison_kernel_sums_deviations_and_their_squares_per_row(shape):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    r, c = g.to(torch.bfloat16), (g * (1 + 1e-3)).to(torch.bfloat16)
    c[..., 3] = float("nan")  # not judged: out of every sum and of the count
    rows = tap_errors(g, r, c, row=shape[-1]).rows
    d, e, gg = ((a.double() - b.double()).reshape(-1, shape[-1]) for a, b in ((c, r), (r, g), (g, 0 * g)))
    judged = torch.isfinite(d)
    d, e, gg = (t.where(judged, 0.0) for t in (d, e, gg))
    want = torch.stack(
        [
            d.sum(-1),
            (d * gg).sum(-1),
            e.sum(-1),
            (e * gg).sum(-1),
            (d + e).square().sum(-1),
            e.square().sum(-1),
            gg.square().sum(-1),
            judged.sum(-1).double(),
            gg.pow(4).sum(-1),
        ]
    )
    assert torch.allclose(torch.from_numpy(rows), want, rtol=1e-12, atol=1e-12)


def test_a_planted_shift_of_a_fifth_of_an_ulp_on_1e4_elements_is_caught_among_clean_taps(catalogue_model):
    # layers.i.attn_norm without layers.(i-1).resid_out: no tap's inputs are known identical, so only the
    # genomic-control test applies
    gen = torch.Generator().manual_seed(0)
    taps = []
    for i in range(40):  # clean taps: the candidate errs by half an ulp either way before its rounding
        g = torch.randn(100, 100, generator=gen, dtype=torch.float64)
        wobble = 1 + 2**-8 * torch.randn(g.shape, generator=gen, dtype=torch.float64)
        name = f"layers.{2 * i}.attn_norm"
        taps.append(_tap(name, g, g.to(torch.bfloat16), (g * wobble).to(torch.bfloat16), torch.bfloat16))
    g = torch.randn(100, 100, generator=gen, dtype=torch.float64)  # 1e4 elements, 100 rows
    planted = _tap("layers.35.attn_norm", g, g.to(torch.bfloat16), shifted(g, torch.bfloat16, 0.2), torch.bfloat16)
    taps.insert(17, planted)
    found = detect(taps, None, torch.bfloat16, load_config(catalogue_model("dense")))
    assert found is not None and found.tap == "layers.35.attn_norm", found
    assert found.signature == "systematic_shift" and found.evidence["test"] == "genomic control", found
    # in ulps at the tap's RMS magnitude, where elements under the RMS count their smaller ulp for less
    assert (
        0.05 < found.evidence["fitted_shift"] < 0.2
        and found.evidence["detection_limit"] < found.evidence["fitted_shift"]
    )


def test_the_sign_test_is_the_exact_binomial_tail():
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_a_planted_shift_in_a_run_is_a_warning_naming_its_tap(catalogue_model, monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "shifted-attn-norm", "qwen3dbg.candidates.planted:ShiftedAttnNorm")
    result = run_diff(
        ref="hf", cand="shifted-attn-norm", model_dir=catalogue_model("dense"), dtype="bfloat16", token_ids=TOKENS
    )
    assert result.first_divergence is None and result.exit_code == 0, result.verdict
    assert result.systematic is not None and result.systematic.tap == "layers.1.attn_norm", result.systematic
    assert result.to_dict()["systematic"]["signature"] == "systematic_shift"
    assert any(label == "systematic" for label, _ in summary(result))


@pytest.mark.parametrize(
    "ref,cand,model,dtype",
    [
        ("hf", "hf:attn=sdpa", "dense", "bfloat16"),
        ("hf", "hf:attn=sdpa", "dense", "float16"),
        ("hf", "hf:attn=sdpa", "moe", "float16"),
        ("hf", "rmsnorm-fused", "hot-qk", "bfloat16"),
        ("hf", "rmsnorm-fused", "dense", "bfloat16"),  # attn_norm departs first, from the exact embedding
        ("hf", "scratch", "moe", "float32"),
        ("scratch", "hf", "dense", "float16"),
        ("hf", "module:qwen3dbg.candidates.ports.standalone_qwen3:load", "dense", "bfloat16"),  # fp32 attn_probs
    ],
)
def test_clean_pairs_raise_no_systematic_finding(catalogue_model, ref, cand, model, dtype):
    result = run_diff(ref=ref, cand=cand, model_dir=catalogue_model(model), dtype=dtype, token_ids=TOKENS[:64])
    tested = [t for t in result.taps if t.extra.get("signed", {}).get("rows", 0) >= MIN_ROWS]
    assert result.first_divergence is None and tested, result.verdict
    assert result.systematic is None, result.systematic.message


def test_a_clean_pair_that_departs_at_its_first_norm_meets_the_sign_test_and_passes_it(catalogue_model):
    """The fused RMSNorm rounds once where HF rounds twice: layer 0's attn_norm, read from the exact embedding,
    is where it departs, so the sign test runs there; rounding moves its rows both ways."""
    model = catalogue_model("dense")
    result = run_diff(ref="hf", cand="rmsnorm-fused", model_dir=model, dtype="bfloat16", token_ids=TOKENS[:64])
    tests = scored(result.taps, None, torch.bfloat16, load_config(model))
    signs = [(score, f) for score, f in tests if f.evidence["test"] == "sign"]
    assert signs and signs[0][1].tap == "layers.0.attn_norm", [f.tap for _, f in signs]
    assert all(score <= 1 for score, _ in signs), [f.message for _, f in signs]


def test_a_side_that_keeps_probabilities_wider_is_not_a_systematic_deviation(catalogue_model):
    """Uniform attention (synthetic weights' first layer): position t holds 1/(t+1) in every head. A port that
    hands float32 probabilities where HF rounds them to bf16 has c - r = the rounding of 1/(t+1), a fixed sign
    per position repeated in each head: no coin, and no bug. Such taps are not sign-tested, and rows with
    identical sums count once."""
    t = torch.arange(128)
    g = torch.where(t[None, :] <= t[:, None], 1 / (t[:, None] + 1.0), 0.0).double().expand(1, 16, 128, 128)
    r, c = g.to(torch.bfloat16), g.to(torch.float32)
    te = tap_errors(g, r, c, row=g.shape[-1])
    wide = signed_stats(te.rows[:4], te.count, te.gold_norm, torch.bfloat16, same_rounding=False)
    alike = signed_stats(te.rows[:4], te.count, te.gold_norm, torch.bfloat16)
    assert "signs_scale" not in wide and alike["rows"] == 16 * 128 and sum(alike["signs_scale"]) <= 128, alike
    tap = TapResult(0, "layers.0.attn_probs", 0, "attn_probs", "ok", diff_ulps=0.1, extra={"signed": wide})
    scores = TapResult(0, "layers.0.attn_scores", 0, "attn_scores", "ok")
    assert detect([scores, tap], None, torch.bfloat16, load_config(catalogue_model("dense"))) is None


@pytest.mark.parametrize("seed", range(8))
def test_sign_counts_are_over_distinct_rows_whatever_repeats_zeros_and_signed_zeros(seed):
    """Against a count over the set of rows: repeated rows (some sharing a shift sum only), rows that move
    neither way, and -0.0 beside 0.0."""
    gen = torch.Generator().manual_seed(seed)
    n = 1 + seed * 37
    rows = torch.randn(4, n, generator=gen, dtype=torch.float64).round(decimals=seed % 3)
    rows = rows[:, torch.randint(0, max(n // 2, 1), (n,), generator=gen)].clone()  # repeats
    rows[:2, torch.rand(n, generator=gen) < 0.2] = 0.0
    rows[0, torch.rand(n, generator=gen) < 0.2] = -0.0
    distinct = {tuple(v + 0.0 for v in col) for col in rows.T.tolist()}
    out = signed_stats(rows, 10 * n, 1.0, torch.bfloat16)
    for i, kind in enumerate(("shift", "scale")):
        assert out[f"signs_{kind}"] == [sum(d[i] < 0 for d in distinct), sum(d[i] > 0 for d in distinct)]
