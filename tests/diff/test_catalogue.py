"""Each catalogue bug, diffed against HF, is found at its exact first divergent (step, layer, tap) and
named by its signature, whether the candidate runs in-process or only left a tap store behind; the
clean pairs report no divergence.
"""

from __future__ import annotations

import re

import json
from dataclasses import dataclass

import pytest
from qwen3dbg.candidates.catalogue import VARIANTS

from qwen3dbg.diff import run_diff
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import IMPLEMENTATIONS, load_candidate
from qwen3dbg.util.errors import UserError

PROMPT, DECODE = [9, 41, 7, 300, 12, 5], [77, 150]
BOTH = ("float32", "bfloat16")


@dataclass(frozen=True)
class Case:
    cand: str  # a name --cand accepts
    model: str  # tests/conftest.py CATALOGUE_MODELS key
    dtypes: tuple[str, ...]
    first: tuple[int, int | None, str] | None  # (step, layer, tap); None: no divergence
    signature: str | None = None


BUGS = [
    Case("embed-scaled", "dense", BOTH, (0, None, "embed"), "embed_scaled"),
    Case("rope-theta-1e4", "moe", BOTH, (0, 0, "layers.0.q_rope"), "rope_theta"),
    Case("rope-interleaved", "dense", BOTH, (0, 0, "layers.0.q_rope"), "rope_layout"),
    Case("qk-norm-over-hidden", "dense", BOTH, (0, 0, "layers.0.q_norm"), "norm_axis"),
    Case("ghost-bias", "ghost-bias", BOTH, (0, 0, "layers.0.q_proj"), "extra_bias"),
    Case("missing-scale", "dense", BOTH, (0, 0, "layers.0.attn_scores"), "scores_scaled"),
    Case("no-causal-mask", "moe", BOTH, (0, 0, "layers.0.attn_scores"), "causal_mask_missing"),
    Case("gqa-modulo", "dense", BOTH, (0, 0, "layers.0.attn_scores"), "gqa_modulo"),
    Case("softmax-wrong-axis", "dense", BOTH, (0, 0, "layers.0.attn_probs"), "softmax_axis"),
    Case("no-transpose", "dense", BOTH, (0, 0, "layers.0.attn_out"), "transpose_before_reshape"),
    Case("kv-cache-off-by-one", "moe", BOTH, (1, 0, "layers.0.k_cache"), "cache_off_by_one"),
    Case("moe-topk-softmax", "moe-nonorm", BOTH, (0, 0, "layers.0.moe.topk_weights"), "moe_topk_softmax"),
    Case("softmax-no-max", "hot-qk", ("float16",), (0, 0, "layers.0.attn_probs"), "softmax_overflow"),
    Case("lowp-accumulation", "wide", ("bfloat16",), (0, 0, "layers.0.q_proj"), "lowp_accumulation"),
]
CLEAN = [
    Case("rmsnorm-fused", "hot-qk", BOTH, None),
    Case("lowp-accumulation", "wide", ("float32",), None),  # float32 accumulation is the right one
]


def _params(cases, every_dtype: bool = True):
    """(case, dtype) for each of a case's dtypes, or only its last (bf16 where both are listed)."""
    return [
        pytest.param(c, dt, id=f"{c.cand}@{c.model}-{dt}")
        for c in cases
        for dt in (c.dtypes if every_dtype else c.dtypes[-1:])
    ]


def _diff(cand: str, model_dir, dtype: str, ref: str = "hf"):
    return run_diff(ref=ref, cand=cand, model_dir=model_dir, dtype=dtype, token_ids=PROMPT, decode_ids=DECODE)


def _through_store(cand: str, model_dir, dtype: str, out, missing: frozenset[str] = frozenset()) -> str:
    """Capture `cand` into a store under a neutral name, so nothing downstream can read the bug's name;
    `missing` ops are left out as an engine that cannot expose them would."""
    impl = load_candidate(cand, model_dir, dtype)
    impl.name, impl.missing_taps = "engine", missing
    capture(impl, forced_steps(PROMPT, DECODE), out)
    return f"store:{out}"


def _first(result):
    d = result.first_divergence
    return None if d is None else (d.step, d.layer, d.tap)


@pytest.mark.parametrize("case,dtype", _params(BUGS))
def test_bug_is_found_at_its_first_divergent_op_and_named(catalogue_model, case, dtype):
    result = _diff(case.cand, catalogue_model(case.model), dtype)
    assert _first(result) == case.first, result.verdict
    assert [d.signature for d in result.diagnosis][:1] == [case.signature], [d.message for d in result.diagnosis]
    assert not [d.message for d in result.diagnosis if re.search(r"\b0x ", d.message)]  # a multiple never reads 0x


# Through a store in one dtype per case: the direct runs above cover the dtypes, these the store path.
@pytest.mark.parametrize("case,dtype", _params(BUGS, every_dtype=False))
def test_bug_is_found_and_named_from_its_tap_store_alone(catalogue_model, tmp_path, case, dtype):
    model = catalogue_model(case.model)
    result = run_diff(ref="hf", cand=_through_store(case.cand, model, dtype, tmp_path / "store"), model_dir=model)
    assert _first(result) == case.first, result.verdict
    assert [d.signature for d in result.diagnosis][:1] == [case.signature], [d.message for d in result.diagnosis]


ATTENTION_MATRICES = frozenset({"attn_scores", "attn_probs"})


@pytest.mark.parametrize(
    "case,dtype", _params([c for c in BUGS if c.first[2].endswith(tuple(ATTENTION_MATRICES))], every_dtype=False)
)
def test_attention_bug_is_named_from_a_store_without_attention_matrices(catalogue_model, tmp_path, case, dtype):
    model = catalogue_model(case.model)
    store = _through_store(case.cand, model, dtype, tmp_path / "store", missing=ATTENTION_MATRICES)
    result = run_diff(ref="hf", cand=store, model_dir=model)
    assert _first(result) == (0, 0, "layers.0.attn_out"), result.verdict
    assert [d.signature for d in result.diagnosis][:1] == [case.signature], [d.message for d in result.diagnosis]


@pytest.mark.parametrize("case,dtype", _params(CLEAN))
def test_clean_variant_reports_no_divergence(catalogue_model, case, dtype):
    result = _diff(case.cand, catalogue_model(case.model), dtype)
    assert result.first_divergence is None, result.verdict


@pytest.mark.parametrize(
    "ref,cand,model,dtype",
    [
        ("hf", "scratch", "dense", "float32"),
        ("scratch", "hf", "moe", "bfloat16"),
        ("hf", "hf:attn=sdpa", "dense", "bfloat16"),
        ("hf", "scratch", "hot-qk", "float16"),
    ],
)
def test_clean_pairs_report_no_divergence(catalogue_model, ref, cand, model, dtype):
    result = _diff(cand, catalogue_model(model), dtype, ref=ref)
    assert result.first_divergence is None, result.verdict


def test_fused_rmsnorm_is_reported_in_the_noise_as_a_rounding_point(catalogue_model):
    result = _diff("rmsnorm-fused", catalogue_model("hot-qk"), "bfloat16")
    assert result.exit_code == 0 and result.in_noise is not None
    assert result.in_noise.signature == "rounding_point", result.in_noise.message
    # The rounding point porters need named is the one the ~96.5 k_norm weight amplifies.
    assert result.in_noise.tap.endswith(".k_norm") and result.in_noise.evidence["max_weight"] == 96.5


def test_the_registry_lists_exactly_the_catalogue_and_each_name_loads_its_variant(catalogue_model):
    listed = {n for n, target in IMPLEMENTATIONS.items() if target.startswith("qwen3dbg.candidates.catalogue:")}
    assert listed == set(VARIANTS)
    for name, cls in VARIANTS.items():
        assert type(load_candidate(name, catalogue_model("dense"), "float32")) is cls


def test_an_unknown_candidate_name_lists_the_catalogue(catalogue_model):
    with pytest.raises(UserError, match="gqa-modulo"):
        load_candidate("gqa-modulus", catalogue_model("dense"), "float32")


def test_cli_diff_of_a_catalogue_bug_exits_1_and_writes_its_diagnosis(catalogue_model, tmp_path):
    from typer.testing import CliRunner

    from qwen3dbg.cli import app

    out = tmp_path / "diff.json"
    args = [
        "diff",
        "--ref",
        "hf",
        "--cand",
        "embed-scaled",
        "--model",
        str(catalogue_model("dense")),
        "--token-ids",
        ",".join(map(str, PROMPT)),
        "--dtype",
        "bf16",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    assert report["first_divergence"]["tap"] == "embed"
    assert report["diagnosis"][0]["signature"] == "embed_scaled"


def test_docs_describe_every_catalogue_variant_and_every_diagnosis_id():
    from pathlib import Path

    from qwen3dbg.diff.diagnosis import SIGNATURE_IDS

    page = (Path(__file__).parents[2] / "docs" / "catalogue.md").read_text()
    assert [n for n in VARIANTS if f"| `{n}` |" not in page] == []
    assert [i for i in SIGNATURE_IDS + ("rounding_order",) if f"`{i}`" not in page] == []
    from qwen3dbg.model.synth import PRESETS

    named = re.findall(r"--preset ([\w.-]+)", page)
    assert "tiny-wide" in named and set(named) <= set(PRESETS)  # every model a row names, make-model makes
