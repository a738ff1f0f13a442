"""The differ's fused per-tap pass against the float64 torch computation it replaces, in every element type."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwen3dbg.diff.fused import count_over, logits_rows, tap_errors
from qwen3dbg.tapstore.store import masked

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
N = 3 * 65536 + 1234  # several partial-sum chunks and a ragged tail


def _sides(kind: str, gold_dtype, side_dtype, seed: int):
    """gold, ref, cand [N] with NaN, +-inf and masked entries; 'ties': quarter-integers, so errors repeat
    exactly (the first index of the extreme matters) and +max = -min happens; 'noise': gaussian."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        g = torch.randint(-20, 21, (N,), generator=gen).double() / 4
        r = g + torch.randint(-1, 2, (N,), generator=gen).double() / 4
        c = g + torch.randint(-2, 3, (N,), generator=gen).double() / 4
    else:
        g = torch.randn(N, dtype=torch.float64, generator=gen)
        r = g + 1e-2 * torch.randn(N, dtype=torch.float64, generator=gen)
        c = g + 3e-2 * torch.randn(N, dtype=torch.float64, generator=gen)
    out = []
    for t, dt in ((g, gold_dtype), (r, side_dtype), (c, side_dtype)):
        t = t.to(dt)
        idx = torch.randint(0, N, (40,), generator=gen)
        t[idx[:10]] = float("nan")
        t[idx[10:20]] = float("inf")
        t[idx[20:30]] = float("-inf")
        t[idx[30:]] = torch.finfo(dt).min  # an additive mask
        out.append(t)
    # the same masked region on every side, as a real causal mask
    for t in out:
        t[1000:1100] = float("-inf")
    return out


def _torch_reference(g, r, c, scores: bool, keep, limit: float) -> dict:
    """The comparison as a dozen float64 torch passes (what the differ did before the fused kernel)."""
    live = torch.ones(g.shape, dtype=torch.bool)  # neither masked nor dropped
    mask_diff = 0
    if scores:
        mg, mr, mc = masked(g), masked(r), masked(c)
        mask_diff = int((mc != mg).sum())
        live = ~(mg | mr | mc)
    if keep is not None:
        live = live & keep
    valid = live & torch.isfinite(g)
    nonfinite = {
        "ref": int((valid & ~torch.isfinite(r)).sum()),
        "cand": int((valid & ~torch.isfinite(c)).sum()),
        "gold": int((live & ~torch.isfinite(g)).sum()),
    }
    judged = valid & torch.isfinite(r) & torch.isfinite(c)
    g64 = torch.where(judged, g.double(), 0.0)
    ec = torch.where(judged, c.double() - g.double(), 0.0)
    er = torch.where(judged, r.double() - g.double(), 0.0)
    hi, lo = int(ec.argmax()), int(ec.argmin())
    i = hi if float(ec[hi]) >= -float(ec[lo]) else lo
    return {
        "count": int(judged.sum()),
        "nonfinite": nonfinite,
        "mask_diff": mask_diff,
        "argmax": i,
        "cand_max": abs(float(ec[i])),
        "ref_max": float(er.abs().max()),
        "gold_max": float(g64.abs().max()),
        "cand_norm": float(ec.norm()),
        "ref_norm": float(er.norm()),
        "gold_norm": float(g64.norm()),
        "dot": float(ec @ g64),
        "dot_scale": float((ec * g64).abs().sum()),
        "diff_norm": float(torch.dist(ec, er)),
        "over": int((ec.abs() > limit).sum()),
    }


@pytest.mark.parametrize("kind", ["ties", "noise"])
@pytest.mark.parametrize("gold_dtype,side_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_fused_pass_equals_float64_torch_with_nonfinite_and_masked_entries(kind, gold_dtype, side_dtype):
    sides = _sides(kind, gold_dtype, side_dtype, seed=DTYPES.index(gold_dtype) * 4 + DTYPES.index(side_dtype))
    keep = torch.rand(N, generator=torch.Generator().manual_seed(7)) > 0.1
    eps = torch.finfo(torch.float64).eps
    seen = {"mask_diff": 0, "nonfinite": 0, "gold": 0}
    for scores, kp in ((False, None), (True, None), (True, keep), (False, keep)):
        if not scores:  # an additive mask left in a non-score tap overflows every sum: make it -inf
            g, r, c = (t.masked_fill(masked(t), float("-inf")) for t in sides)
        else:
            g, r, c = sides
        want = _torch_reference(g, r, c, scores, kp, limit=0.3)
        got = tap_errors(g, r, c, scores=scores, keep=kp)
        assert (got.count, got.nonfinite, got.mask_diff) == (want["count"], want["nonfinite"], want["mask_diff"])
        assert (got.cand.argmax, got.cand.max_abs) == (want["argmax"], want["cand_max"])
        assert (got.ref.max_abs, got.gold_max) == (want["ref_max"], want["gold_max"])
        # sums in another order: within n ulps of float64
        for name, value in (
            ("cand_norm", got.cand.norm),
            ("ref_norm", got.ref.norm),
            ("gold_norm", got.gold_norm),
            ("diff_norm", got.diff_norm),
        ):
            assert value == want[name] or abs(value - want[name]) <= N * eps * want[name], name
        assert got.dot == want["dot"] or abs(got.dot - want["dot"]) <= N * eps * want["dot_scale"]
        assert count_over(g, r, c, 0.3, scores=scores, keep=kp) == want["over"]
        seen["mask_diff"] += want["mask_diff"]
        seen["nonfinite"] += want["nonfinite"]["cand"]
        seen["gold"] += want["nonfinite"]["gold"]
    assert seen["mask_diff"] > 0 and seen["nonfinite"] > 0 and seen["gold"] > 0  # the data exercises each


def test_fused_pass_of_an_empty_tap_compares_nothing():
    e = torch.zeros(0, 4, dtype=torch.bfloat16)
    got = tap_errors(e.double(), e, e)
    assert got.count == 0 and got.cand.max_abs == 0.0 and got.gold_norm == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_rows_match_torch_argmax_topk_and_log_softmax_kl(dtype):
    gen = torch.Generator().manual_seed(3)
    g = 4 * torch.randn(12, 1000, dtype=torch.float64, generator=gen)
    sides = [(g + e * torch.randn(12, 1000, dtype=torch.float64, generator=gen)).to(dtype) for e in (0.1, 0.01)]
    c = sides[0]
    c[1, 5] = float("nan")  # argmax takes the first NaN; the row has no KL
    c[2, 7] = float("-inf")
    g[3, 9] = float("inf")
    c[4, :] = c[4, 0]  # all tied: the first indices
    got = logits_rows(g, *sides, k=5)
    for i, t in enumerate((g, *sides)):
        assert torch.equal(got.top[i, :, 0], t.double().argmax(-1))
    assert got.top[1, 4].tolist() == [0, 1, 2, 3, 4]
    # the k largest values, largest first, equal values in index order (rounded rows hold ties)
    for i, t in enumerate((g, *sides)):
        rows = [0, 5, 6, 7, 8, 10, 11]
        x, top = t.double()[rows], got.top[i, rows]
        picked = x.gather(-1, top)
        assert torch.equal(picked, x.topk(5, -1).values)
        tied = picked[:, 1:] == picked[:, :-1]
        assert (top[:, 1:] > top[:, :-1])[tied].all()
    lg = torch.log_softmax(g, -1)
    for s, side in enumerate(sides):
        lc = torch.log_softmax(side.double(), -1)
        want_ok = torch.isfinite(lc).all(-1) & torch.isfinite(lg).all(-1)
        ok, kl = got.ok[s], got.kl[s]
        assert torch.equal(ok, want_ok) and not ok[3]
        want = (lg.exp() * (lg - lc)).sum(-1)
        # exp within a few ulp and sums over V terms: within (V + 64) eps of the row's magnitude
        scale = 1 + g.abs().amax(-1) + side.double().abs().nan_to_num(0, 0, 0).amax(-1)
        bound = (g.shape[-1] + 64) * torch.finfo(torch.float64).eps * scale
        assert ((kl - want).abs() <= bound)[ok].all()
    assert not got.ok[0, 1:4].any()
