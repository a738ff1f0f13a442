"""The hypothesis engine explains bugs the catalogue does not hold, one planted bug per kind, by family,
naming the operand or parameter, from a streaming diff's window of taps or from a store under a neutral name.

Each planted bug is a subclass of the readable reference written here (never in candidates/catalogue.py).
Direct runs see the taps through `Window`, the data contract of a streaming diff: at the divergent step
the divergent layer's taps and the previous layer's, every layer's cache, the tail only when the
divergence is there; at the step before, the divergent layer's taps; nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import rewrite_checkpoint
from qwen3dbg.reference.qwen3 import Qwen3Reference, rms_norm, swiglu
from test_diagnosis import DECODE, PROMPT, STEPS, Sides

from qwen3dbg.candidates.catalogue import VARIANTS
from qwen3dbg.diff import run_diff
from qwen3dbg.diff.diagnosis import FAMILIES, diagnose
from qwen3dbg.diff.diagnosis.hypothesis import is_linear, replay_floor, replay_op
from qwen3dbg.diff.diagnosis.site import Site
from qwen3dbg.diff.metrics import rel
from qwen3dbg.run.candidate import emit
from qwen3dbg.run.capture import capture, forced_steps, run_steps
from qwen3dbg.tapstore.schema import parse_tap_name


class Window:
    """A TapSource that holds only what a streaming diff keeps around the first divergence at (step, tap)."""

    def __init__(self, src, step: int, tap: str):
        self.src, self.config, self.steps, self.dtype = src, src.config, src.steps, src.dtype
        self.at, self.tap, (self.layer, _) = step, tap, parse_tap_name(tap)

    def held(self, step: int, name: str) -> bool:
        layer, op = parse_tap_name(name)
        last = self.config.num_hidden_layers - 1
        if step == self.at - 1:
            return layer == self.layer and layer is not None
        if step != self.at:
            return False
        if op in ("k_cache", "v_cache"):
            return True
        if self.layer is None:  # embed, or the tail after the last layer
            return name == "embed" if self.tap == "embed" else layer in (None, last) and op != "embed"
        return layer in (self.layer, self.layer - 1) or (name == "embed" and self.layer == 0)

    def cand(self, step, name):
        return self.src.cand(step, name) if self.held(step, name) else None

    def ref(self, step, name):
        return self.src.ref(step, name) if self.held(step, name) else None

    def gold(self, step, name):
        g = self.src.gold(step, name) if self.held(step, name) else None
        return g.float() if g is not None and self.dtype != torch.float32 else g

    def weight(self, name):
        return self.src.weight(name)


# ---- planted bugs, one per kind ---------------------------------------------------------------------


class QNormWithKNormWeight(Qwen3Reference):
    """q_norm applies the layer's k_norm weight."""

    def head_norm(self, x, name):
        return super().head_norm(x, name.replace("q_norm", "k_norm"))


class MlpNormPreviousLayer(Qwen3Reference):
    """post_attention_layernorm of layer i > 0 loads layer i - 1's weight."""

    def norm(self, x, name):
        if name.endswith("post_attention_layernorm") and not name.startswith("model.layers.0."):
            i = int(name.split(".")[2])
            name = f"model.layers.{i - 1}.post_attention_layernorm"
        return super().norm(x, name)


class LayerNormForRmsNorm(Qwen3Reference):
    """LayerNorm (mean subtracted) in place of RMSNorm, in float32 statistics."""

    def norm(self, x, name):
        xw = x.float()
        return rms_norm(
            (xw - xw.mean(-1, keepdim=True)).to(x.dtype), self.w[name + ".weight"], self.config.rms_norm_eps, self.num
        )


def with_eps(eps: float) -> type[Qwen3Reference]:
    class WrongEps(Qwen3Reference):
        """Every RMSNorm with another eps than the config's (a port's model builder default)."""

        def norm(self, x, name):
            return rms_norm(x, self.w[name + ".weight"], eps, self.num)

    return WrongEps


class SwigluSwapped(Qwen3Reference):
    """silu(up) * gate in the dense MLP and in every expert."""

    def linear(self, x, name):
        y = super().linear(x, name)
        if name.endswith("gate_up_proj"):  # an expert's fused [gate; up] projection
            gate, up = y.chunk(2, dim=-1)
            return torch.cat((up, gate), -1)
        return y

    def dense_mlp(self, i, x, sink):
        p = f"model.layers.{i}.mlp."
        gate, up = super().linear(x, p + "gate_proj"), super().linear(x, p + "up_proj")
        act = swiglu(up, gate)
        emit(sink, i, "mlp.gate", gate), emit(sink, i, "mlp.up", up), emit(sink, i, "mlp.act", act)
        return super().linear(act, p + "down_proj")


class KProjTransposed(Qwen3Reference):
    """k_proj's weight used transposed (square on the tiny models: 64 x 64)."""

    def linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"].T) if name.endswith("k_proj") else super().linear(x, name)


class HeadNotTied(Qwen3Reference):
    """The LM head that the config does not ask for: lm_head.weight when tied, the embedding when not."""

    def logits(self, x):
        name = "lm_head.weight" if self.config.tie_word_embeddings else "model.embed_tokens.weight"
        return F.linear(x, self.w[name])


class ResidualFromNormed(Qwen3Reference):
    """The attention residual starts from the normalised input instead of the raw one."""

    def residual(self, x, normed):
        return normed  # right: x


class CachePreRope(Qwen3Reference):
    """Keys written to the cache before RoPE."""

    def head_norm(self, x, name):
        out = super().head_norm(x, name)
        if name.endswith("k_norm"):
            self.k_unrotated = out
        return out

    def update_cache(self, layer, k, v):
        return super().update_cache(layer, self.k_unrotated.transpose(1, 2), v)


class AttendsPreviousLayerCache(Qwen3Reference):
    """At decode, layer i > 0 attends over layer i - 1's cache (its own is written right)."""

    def update_cache(self, layer, k, v):
        self.at, decoding = layer, self.cache[layer] is not None
        k, v = super().update_cache(layer, k, v)
        self.other = self.cache[layer - 1] if decoding and layer > 0 else None
        return k, v

    def scores(self, q, k, mask):
        return super().scores(q, self.other[0] if self.other else k, mask)

    def context(self, probs, v):
        return super().context(probs, self.other[1] if self.other else v)


class ExpertsOffByOne(Qwen3Reference):
    """The router's expert e + 1 runs expert e's weights (ids counted from 1)."""

    def linear(self, x, name):
        if ".experts." in name:
            head, e, leaf = name.rsplit(".", 2)
            name = f"{head}.{(int(e) - 1) % self.config.num_experts}.{leaf}"
        return super().linear(x, name)


class SoftmaxTemperature(Qwen3Reference):
    """Sampling temperature 0.7 applied inside attention's softmax."""

    def probs(self, scores):
        return super().probs(scores / 0.7)


class RopeTwice(Qwen3Reference):
    """RoPE applied twice (once in the attention block, once more in a helper)."""

    def apply_rope(self, x, cos, sin):
        return super().apply_rope(super().apply_rope(x, cos, sin), cos, sin)


# ---- cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    cls: Callable[[str], type[Qwen3Reference]]  # dtype -> the planted bug
    models: tuple[str, ...]
    step: int
    tap: str
    signature: str
    claim: Callable[[dict, str], bool]  # on the evidence and dtype: the named operand or parameter
    #: the store path's reference; transformers itself unties a head whose checkpoint holds both tensors
    ref: str = "hf"


BOTH_MODELS = ("dense", "moe")
EPS = {"float32": 1e-5, "bfloat16": 1e-3}  # bf16 hides 1e-5 under its noise: the systematic test covers that

CASES = [
    Case(
        "q_norm-applies-k_norm-weight",
        lambda dt: QNormWithKNormWeight,
        BOTH_MODELS,
        0,
        "layers.0.q_norm",
        "weight_substituted",
        lambda ev, dt: ev["weight"] == "model.layers.0.self_attn.k_norm.weight",
    ),
    Case(
        "mlp_norm-previous-layer-weight",
        lambda dt: MlpNormPreviousLayer,
        BOTH_MODELS,
        0,
        "layers.1.mlp_norm",
        "weight_substituted",
        lambda ev, dt: ev["weight"] == "model.layers.0.post_attention_layernorm.weight",
    ),
    Case(
        "layernorm-for-rmsnorm",
        lambda dt: LayerNormForRmsNorm,
        BOTH_MODELS,
        0,
        "layers.0.attn_norm",
        "layer_norm",
        lambda ev, dt: True,
    ),
    Case(
        "rmsnorm-eps",
        lambda dt: with_eps(EPS[dt]),
        BOTH_MODELS,
        0,
        "layers.0.attn_norm",
        "norm_eps",
        lambda ev, dt: ev["config_eps"] == 1e-6 and math.isclose(ev["fitted_eps"], EPS[dt], rel_tol=0.05),
    ),
    Case(
        "swiglu-swapped-dense",
        lambda dt: SwigluSwapped,
        ("dense",),
        0,
        "layers.0.mlp.act",
        "swiglu_swapped",
        lambda ev, dt: True,
    ),
    Case(
        "swiglu-swapped-experts",
        lambda dt: SwigluSwapped,
        ("moe",),
        0,
        "layers.0.mlp.out",
        "swiglu_swapped",
        lambda ev, dt: True,
    ),
    Case(
        "k_proj-transposed",
        lambda dt: KProjTransposed,
        BOTH_MODELS,
        0,
        "layers.0.k_proj",
        "weight_transposed",
        lambda ev, dt: ev["weight"] == "model.layers.0.self_attn.k_proj.weight",
    ),
    Case(
        "lm_head-not-tied",
        lambda dt: HeadNotTied,
        ("dense-head",),
        0,
        "logits",
        "weight_substituted",
        lambda ev, dt: ev["weight"] == "lm_head.weight" and ev["expected"] == "model.embed_tokens.weight",
        "scratch",
    ),
    Case(
        "lm_head-tied-when-untied",
        lambda dt: HeadNotTied,
        ("moe",),
        0,
        "logits",
        "weight_substituted",
        lambda ev, dt: ev["weight"] == "model.embed_tokens.weight" and ev["expected"] == "lm_head.weight",
    ),
    Case(
        "residual-from-normed-input",
        lambda dt: ResidualFromNormed,
        BOTH_MODELS,
        0,
        "layers.0.resid_mid",
        "input_substituted",
        lambda ev, dt: ev["operand"] == "layers.0.attn_norm" and ev["expected"] == "embed",
    ),
    Case(
        "keys-cached-before-rope",
        lambda dt: CachePreRope,
        BOTH_MODELS,
        0,
        "layers.0.k_cache",
        "input_substituted",
        lambda ev, dt: ev["operand"] == "layers.0.k_norm",
    ),
    Case(
        "attends-previous-layer-cache",
        lambda dt: AttendsPreviousLayerCache,
        BOTH_MODELS,
        1,
        "layers.1.attn_scores",
        "input_substituted",
        lambda ev, dt: ev["operand"] == "layers.0.k_cache" and ev["expected"] == "layers.1.k_cache",
    ),
    Case(
        "experts-off-by-one",
        lambda dt: ExpertsOffByOne,
        ("moe",),
        0,
        "layers.0.mlp.out",
        "moe_expert_index",
        lambda ev, dt: ev["expert_shift"] == -1,
    ),
    Case(
        "softmax-temperature",
        lambda dt: SoftmaxTemperature,
        ("dense",),
        0,
        "layers.0.attn_probs",
        "softmax_temperature",
        lambda ev, dt: math.isclose(ev["factor"], 1 / 0.7, rel_tol=0.01),
    ),
    Case("rope-twice", lambda dt: RopeTwice, ("dense",), 0, "layers.0.q_rope", "rope_twice", lambda ev, dt: True),
]
DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def model(catalogue_model, tmp_path_factory):
    """Catalogue models, plus 'dense-head': tiny-dense (tied) whose checkpoint also carries an lm_head.weight."""

    def get(key: str):
        if key != "dense-head":
            return catalogue_model(key)
        dst = tmp_path_factory.getbasetemp() / "dense-head"
        if not dst.exists():

            def add_head(t):
                head = torch.randn(t["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(1))
                return t | {"lm_head.weight": (head * 0.125).to(t["model.embed_tokens.weight"].dtype)}

            rewrite_checkpoint(catalogue_model("dense"), dst, add_head)
        return dst

    return get


@pytest.fixture(scope="module")
def planted(model):
    """planted(model_key, dtype, cls) -> Sides over in-memory runs (the reference runs once per model and dtype)."""
    refs = {}

    def make(key: str, dtype: str, cls) -> Sides:
        d = model(key)
        for dt in (dtype, "float64"):
            if (key, dt) not in refs:
                refs[key, dt] = run_steps(Qwen3Reference(d, dt), STEPS)
        return Sides(d, dtype, cls(d, dtype), refs[key, dtype], refs[key, "float64"])

    return make


def _params():
    return [pytest.param(c, m, dt, id=f"{c.name}@{m}-{dt}") for c in CASES for m in c.models for dt in DTYPES]


@pytest.mark.parametrize("case,model_key,dtype", _params())
def test_a_bug_outside_the_catalogue_is_explained_from_the_window_with_its_operand(planted, case, model_key, dtype):
    src = planted(model_key, dtype, case.cls(dtype))
    assert not torch.equal(src.cand(case.step, case.tap), src.ref(case.step, case.tap))
    found = diagnose(Window(src, case.step, case.tap), case.step, case.tap)
    assert found, f"nothing explains {case.name} at {case.tap}"
    best = found[0]
    assert best.signature == case.signature, [d.message for d in found]
    assert case.claim(best.evidence, dtype), best.evidence
    assert 0 <= best.evidence["residual_in_noise"] <= 1 and "the noise floor" in best.message


@pytest.mark.parametrize("model_key", BOTH_MODELS)
def test_another_layers_cache_is_named_from_attn_out_without_attention_matrices(planted, model_key):
    from test_diagnosis import WithoutAttentionMatrices

    src = WithoutAttentionMatrices(planted(model_key, "bfloat16", AttendsPreviousLayerCache))
    found = diagnose(Window(src, 1, "layers.1.attn_out"), 1, "layers.1.attn_out")
    assert [d.signature for d in found][:1] == ["input_substituted"], [d.message for d in found]
    assert found[0].evidence["operand"] == "layers.0.k_cache"


# Through a store under a neutral name, in bf16 (the direct runs cover both dtypes), the whole differ.
@pytest.mark.parametrize("case,model_key", [pytest.param(c, c.models[-1], id=c.name) for c in CASES])
def test_a_bug_outside_the_catalogue_is_found_and_explained_from_its_tap_store(model, tmp_path, case, model_key):
    d = model(model_key)
    impl = case.cls("bfloat16")(d, "bfloat16")
    impl.name = "engine"
    capture(impl, forced_steps(PROMPT, DECODE), tmp_path / "store")
    result = run_diff(ref=case.ref, cand=f"store:{tmp_path / 'store'}", model_dir=d)
    div = result.first_divergence
    assert div is not None and (div.step, div.tap) == (case.step, case.tap), result.verdict
    assert [x.signature for x in result.diagnosis][:1] == [case.signature], [x.message for x in result.diagnosis]
    assert case.claim(result.diagnosis[0].evidence, "bfloat16"), result.diagnosis[0].evidence


# ---- a longer prompt: the noise upstream of the op grows past the bug's own effect -------------------------

#: hot-qk's sharp attention in bf16 over this many tokens leaves the reference about 8% off fp64 at layer 1's
#: mlp_norm, so that the tap's noise floor (3x that) is above the 25% a substituted norm weight moves it
LONG_PROMPT = torch.randint(3, 512, (192,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def long_sides(catalogue_model):
    """long_sides(cls) -> Sides of hot-qk in bf16 over LONG_PROMPT (the reference runs once)."""
    d, steps = catalogue_model("hot-qk"), forced_steps(LONG_PROMPT, [])
    ref, gold = (run_steps(Qwen3Reference(d, dt), steps) for dt in ("bfloat16", "float64"))
    return lambda cls: Sides(d, "bfloat16", cls(d, "bfloat16"), ref, gold, steps)


def test_a_substituted_weight_is_named_where_the_taps_noise_floor_has_grown_past_its_effect(long_sides):
    tap = "layers.1.mlp_norm"
    src = Window(long_sides(MlpNormPreviousLayer), 0, tap)
    s = Site(src, 0, *parse_tap_name(tap))
    # the mechanism: the differ flags the tap, yet the candidate is within the tap's floor of Qwen3's replay
    assert s.divergent() and rel(s.cand(), s.base()) <= s.tol
    found = diagnose(src, 0, tap)
    assert [d.signature for d in found][:1] == ["weight_substituted"], [d.message for d in found]
    assert found[0].evidence["weight"] == "model.layers.0.post_attention_layernorm.weight"
    assert 0 <= found[0].evidence["residual_in_noise"] <= 1


def test_nothing_but_the_accumulation_is_named_for_low_precision_sums_under_the_replays_own_floor(long_sides):
    """bf16 accumulation in every matmul leaves each projection more than the op's own rounding away from
    Qwen3's replay on the same operands (past the replay's floor, where the tap's floor hid it): no hypothesis
    but the recomputations (which name the accumulation) may then claim a structure, a parameter, another
    weight or operand, or an edit of the grammar, at any tap of the long prompt."""
    src = long_sides(VARIANTS["lowp-accumulation"])
    claims, past_floor = [], 0
    for name in src._cand[0]:
        s = Site(src, 0, *parse_tap_name(name))
        if not s.cand().is_floating_point():
            continue
        if is_linear(s) and s.op != "logits":
            past_floor += rel(s.cand(), replay_op(s, [s.operand(s.inputs[0])])) > replay_floor(s)
        for family, hyps in FAMILIES:
            if family == "recompute":
                continue
            for h in hyps:
                if (s.op in h.ops or "*" in h.ops) and not h.nonfinite and (d := h.check(s)) is not None:
                    claims.append((name, d.message))
    assert past_floor > 0  # the gate under test is reached
    assert claims == []
