"""The divergence rule and the per-tap metrics, on hand-made tensors: the floor is never zero, a more
accurate candidate is never divergent, coordinates name the element."""

from __future__ import annotations

import torch

from qwen3dbg.diff.fused import logits_counts
from qwen3dbg.diff.metrics import agreement, cosine, router_margin, same_sets, worst_coordinate
from qwen3dbg.diff.noise import ELEMENT_FACTOR, NORM_FACTOR, SMALL_SAMPLE_N0, tolerance

MANY = 1_000_000  # elements: no small-sample allowance to speak of

BF16_EPS = torch.finfo(torch.bfloat16).eps


def test_an_exact_reference_still_leaves_a_floor_of_a_few_ulps_at_the_taps_magnitude():
    tol = tolerance(torch.bfloat16, ref_rel_l2=0.0, ref_max_abs=0.0, gold_max_abs=8.0, count=MANY)
    one_rounding = 0.5 * BF16_EPS * 8.0  # half an ulp at the largest magnitude
    assert tol.rel > 0 and tol.abs_ > 0
    assert tol.excess(rel_l2=0.3 * BF16_EPS, max_abs=one_rounding) < 1
    assert tol.excess(rel_l2=0.3 * BF16_EPS, max_abs=20 * BF16_EPS * 8.0) > 1


def test_a_candidate_more_accurate_than_the_reference_is_never_divergent():
    for ref_rel, ref_max in [(1e-3, 1e-2), (0.05, 0.4), (BF16_EPS, BF16_EPS)]:
        tol = tolerance(torch.bfloat16, ref_rel, ref_max, gold_max_abs=4.0, count=16)
        assert tol.excess(0.5 * ref_rel, 0.5 * ref_max) < 1


def test_a_candidate_beyond_the_factor_on_either_statistic_is_divergent():
    ref_rel, ref_max = 0.02, 0.1
    tol = tolerance(torch.bfloat16, ref_rel, ref_max, gold_max_abs=4.0, count=MANY)
    assert tol.excess(1.01 * NORM_FACTOR * ref_rel, ref_max) > 1
    assert tol.excess(ref_rel, 1.01 * ELEMENT_FACTOR * ref_max) > 1
    assert tol.excess(0.99 * NORM_FACTOR * ref_rel, 0.99 * ELEMENT_FACTOR * ref_max) < 1


def test_a_small_sample_widens_the_norm_tolerance_by_its_uncertainty():
    few, many = (tolerance(torch.bfloat16, 0.02, 0.1, 4.0, count=n) for n in (SMALL_SAMPLE_N0, MANY))
    assert abs(few.rel / many.rel - 2**0.5) < 1e-3
    assert few.abs_ == many.abs_


def test_worst_coordinate_splits_merged_heads_into_head_and_channel():
    shape, axes = (1, 3, 4 * 8), ("B", "T", "nH*D")
    flat = 2 * 32 + 2 * 8 + 5
    assert worst_coordinate(flat, shape, axes, step=1, head_dim=8) == {
        "step": 1,
        "batch": 0,
        "token": 2,
        "head": 2,
        "channel": 5,
    }


def test_worst_coordinate_of_attention_names_head_token_and_key():
    shape, axes = (1, 2, 3, 5), ("B", "nH", "T", "S")
    flat = 1 * 15 + 2 * 5 + 4
    assert worst_coordinate(flat, shape, axes, step=0, head_dim=8) == {
        "step": 0,
        "batch": 0,
        "head": 1,
        "token": 2,
        "key": 4,
    }


def test_cosine_from_the_error_agrees_with_its_definition():
    g = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = g + 0.1 * torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = (x - g).view(-1)
    direct = float(torch.nn.functional.cosine_similarity(x.view(-1), g.view(-1), dim=0))
    assert abs(cosine(float(e @ g.view(-1)), float(g.norm()), float(e.norm())) - direct) < 1e-12


def test_logits_agreement_sees_a_changed_top1_and_no_kl_for_equal_logits():
    g = torch.tensor([[[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]]], dtype=torch.float64)
    same = agreement(logits_counts(g, g, k=2))
    assert same["top1_agreement"] == 1.0 and same["top2_overlap"] == 1.0 and abs(same["kl"]) < 1e-15
    swapped = g.clone()
    swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
    assert agreement(logits_counts(g, swapped, k=2))["top1_agreement"] == 0.5


def test_router_margin_is_the_gap_after_the_kth_expert_and_sets_ignore_order():
    logits = torch.tensor([[5.0, 1.0, 4.5, 0.0]])
    assert router_margin(logits, 2).tolist() == [3.5]
    assert same_sets(torch.tensor([[2, 0]]), torch.tensor([[0, 2]])).tolist() == [True]
    assert same_sets(torch.tensor([[2, 1]]), torch.tensor([[0, 2]])).tolist() == [False]
