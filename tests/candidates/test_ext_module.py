"""`--cand module:...`: a PyTorch port tapped through a TOML mapping (the shipped standalone port)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import DECODE, PROMPT, first_divergence
from qwen3dbg.candidates.module_adapter import RERUN_NOTE, TapOrigin, apply_transforms, load_mapping

from qwen3dbg.model.config import load_config
from qwen3dbg.diff.summary import summary
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.schema import axis_sizes
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.tapstore.validate import validate_store
from qwen3dbg.util.errors import UserError

PORT = "module:qwen3dbg.candidates.ports.standalone_qwen3:load"
MAPPING = Path(__file__).resolve().parents[2] / "candidates" / "mappings" / "standalone_qwen3.toml"
STEPS = forced_steps(PROMPT, DECODE)


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


def capture_store(spec: str, model: Path, dtype: str, out: Path) -> TapStore:
    capture(load_candidate(spec, model, dtype), STEPS, out)
    return TapStore.open(out)


def test_taps_reach_the_sink_while_the_forward_runs(dense):
    """A forward's taps are handed out as the port computes them, never collected for the whole forward
    first: each layer's taps arrive before the next layer's block has run (its resid_out, the block's own
    output, as the block returns), so a long prompt's attention matrices never sit in memory together."""
    cand = load_candidate(PORT, dense, "float32")
    done = []
    hooks = [b.register_forward_hook(lambda *_: done.append(1)) for b in cand.model.trf_blocks]
    arrived: dict[str, int] = {}

    class Sink:
        def wants(self, name: str) -> bool:
            return True

        def __call__(self, name: str, t: torch.Tensor) -> None:
            arrived[name] = len(done)

    cand.reset()
    try:
        cand.step(torch.arange(7)[None], torch.arange(7)[None], Sink())
    finally:
        for h in hooks:
            h.remove()
    late = {n: k for n, k in arrived.items() if n.startswith("layers.") and k > int(n.split(".")[1]) + 1}
    assert len(arrived) > 3 * len(done) and not late


def test_standalone_port_store_is_valid_and_complete(tmp_path, dense):
    store = capture_store(PORT, dense, "float32", tmp_path / "port")
    assert validate_store(tmp_path / "port", load_config(dense)) == []
    assert store.missing_taps == [], "the worked mapping covers every tap of a dense model"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_standalone_port_agrees_with_the_reference(dense, dtype):
    assert first_divergence(dense, PORT, dtype) is None


def test_port_without_a_cache_is_rerun_and_its_manifest_says_so(tmp_path, dense):
    store = capture_store(PORT, dense, "float32", tmp_path / "port")
    assert store.manifest["notes"] == [RERUN_NOTE]
    assert store.get(2, "layers.0.k_cache").shape[2] == len(STEPS[0].token_ids[0]) + 2
    assert store.get(2, "layers.0.q_rope").shape[1] == 1


BUGGY_PORT = '''
from qwen3dbg.candidates.ports import standalone_qwen3 as port

TAP_MAPPING = port.TAP_MAPPING


def load(model_dir, dtype):
    """The port with gate_proj and up_proj loaded the wrong way round in layer 1."""
    model = port.load(model_dir, dtype)
    ff = model.trf_blocks[1].ff
    ff.fc1.weight.data, ff.fc2.weight.data = ff.fc2.weight.data.clone(), ff.fc1.weight.data.clone()
    return model
'''


def test_port_from_a_file_with_swapped_gate_and_up_is_localized_to_mlp_gate(tmp_path, dense):
    (tmp_path / "buggy_port.py").write_text(BUGGY_PORT)
    found = first_divergence(dense, f"module:{tmp_path / 'buggy_port.py'}:load", "float32")
    assert found == "step 0: layers.1.mlp.gate"


def test_a_ports_origin_is_estimated_and_says_so_without_calling_it_a_store(tmp_path, dense):
    from qwen3dbg.diff import run_diff

    (tmp_path / "buggy_port.py").write_text(BUGGY_PORT)
    result = run_diff("hf", f"module:{tmp_path / 'buggy_port.py'}:load", model_dir=dense, dtype="float32")
    origin = result.first_divergence.origin
    assert origin["method"] == "error jump" and "not rerun alone" in origin["message"]
    assert "store" not in dict(summary(result))["origin"]


def test_transforms_slice_a_fused_gate_up_and_move_head_axes():
    cfg = load_config_like()
    sizes = axis_sizes(cfg, 2, 3, 3)
    gate, up = torch.randn(2, 3, cfg.intermediate_size), torch.randn(2, 3, cfg.intermediate_size)
    fused = torch.cat((gate, up), dim=-1)
    assert torch.equal(apply_transforms(fused, ("slice(-1,0,I)",), sizes), gate)
    assert torch.equal(apply_transforms(fused, ("slice(-1,I,2*I)",), sizes), up)
    heads = torch.randn(2, cfg.num_attention_heads, 3, cfg.head_dim)  # [B, nH, T, D]
    flat = apply_transforms(heads, ("transpose(1,2)", "reshape(B,T,nH*D)"), sizes)
    assert torch.equal(flat[1, 2, cfg.head_dim : 2 * cfg.head_dim], heads[1, 1, 2])


def load_config_like():
    from qwen3dbg.model.synth import PRESETS

    return PRESETS["tiny-dense"].config


@pytest.mark.parametrize(
    "text,complaint",
    [
        ('[taps]\n"layers.{i}.nope" = "x"', "not a tap name"),
        ('[taps]\nembed = { module = "tok_emb", function = "f" }', "exactly one of module/function"),
        ('[taps]\nembed = { module = "tok_emb", transform = ["flip(0)"] }', "is not transpose"),
        ('[taps]\nembed = { module = "tok_emb", transform = ["reshape(B,Q)"] }', "is not transpose"),
        ('[call]\nkv_cache = true\n[taps]\nembed = "tok_emb"', "reset = .* or positions = "),
        ('[taps]\nembed = { module = "tok_emb", select = "[x]" }', "is not a chain"),
        ('[taps]\n"layers.{i}.q_rope" = { function = "f", call = "2*j" }', "not an integer expression"),
        ("[taps", "not valid TOML"),
    ],
)
def test_a_bad_mapping_is_explained_in_one_sentence(tmp_path, text, complaint):
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(UserError, match=complaint):
        load_mapping(tmp_path / "m.toml", load_config_like())


def test_a_mapping_naming_a_module_the_port_lacks_is_refused_at_load(tmp_path, dense):
    text = MAPPING.read_text().replace('"trf_blocks.{i}.ff.fc1"', '"trf_blocks.{i}.ff.gate_proj"')
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(UserError, match="gate_proj"):
        load_candidate(f"{PORT}@{tmp_path / 'm.toml'}", dense, "float32")


CACHED_PORT = '''
import torch
from transformers import AutoModelForCausalLM


class CachedHF(torch.nn.Module):
    """transformers' Qwen3 (sdpa) behind a port-style forward(ids) that keeps its own KV cache."""

    def __init__(self, model):
        super().__init__()
        self.hf = model
        self.past = None

    def reset_cache(self):
        self.past = None

    def forward(self, ids):
        out = self.hf(input_ids=ids, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits


def load(model_dir, dtype):
    return CachedHF(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval())
'''
# Module outputs only: RoPE, the cache and the attention matrices are left unmapped on purpose.
CACHED_MAPPING = """
[call]
kv_cache = true
reset = "reset_cache"

[taps]
embed = "hf.model.embed_tokens"
"layers.{i}.attn_norm" = "hf.model.layers.{i}.input_layernorm"
"layers.{i}.q_proj" = "hf.model.layers.{i}.self_attn.q_proj"
"layers.{i}.k_proj" = "hf.model.layers.{i}.self_attn.k_proj"
"layers.{i}.v_proj" = "hf.model.layers.{i}.self_attn.v_proj"
"layers.{i}.q_norm" = "hf.model.layers.{i}.self_attn.q_norm"
"layers.{i}.k_norm" = "hf.model.layers.{i}.self_attn.k_norm"
"layers.{i}.attn_out" = { module = "hf.model.layers.{i}.self_attn.o_proj", input = 0 }
"layers.{i}.o_proj" = "hf.model.layers.{i}.self_attn.o_proj"
"layers.{i}.resid_mid" = { module = "hf.model.layers.{i}.post_attention_layernorm", input = 0 }
"layers.{i}.mlp_norm" = "hf.model.layers.{i}.post_attention_layernorm"
"layers.{i}.mlp.gate" = "hf.model.layers.{i}.mlp.gate_proj"
"layers.{i}.mlp.up" = "hf.model.layers.{i}.mlp.up_proj"
"layers.{i}.mlp.act" = { module = "hf.model.layers.{i}.mlp.down_proj", input = 0 }
"layers.{i}.mlp.out" = "hf.model.layers.{i}.mlp"
"layers.{i}.resid_out" = "hf.model.layers.{i}"
final_norm = "hf.model.norm"
logits = "hf.lm_head"
"""


def test_port_with_its_own_cache_and_a_partial_mapping_runs_step_by_step(tmp_path, dense):
    (tmp_path / "cached_port.py").write_text(CACHED_PORT)
    (tmp_path / "cached.toml").write_text(CACHED_MAPPING)
    spec = f"module:{tmp_path / 'cached_port.py'}:load@{tmp_path / 'cached.toml'}"
    store = capture_store(spec, dense, "bfloat16", tmp_path / "port")
    assert sorted(store.missing_taps) == ["attn_probs", "attn_scores", "k_cache", "k_rope", "q_rope", "v_cache"]
    assert store.get(1, "layers.0.k_proj").shape[1] == 1, "a decode step feeds the port one token"
    assert store.manifest["notes"] == []
    assert first_divergence(dense, spec, "bfloat16") is None


# HF's own modules, as docs/ports.md maps them: the port returns transformers' ModelOutput, RoPE is taken from
# the function modeling_qwen3 calls (a dotted path: a bare name would resolve in this wrapper's module) and the
# cache from DynamicCache's update, whose (keys, values) over the whole cache are selected by [0] and [1].
HF_MAPPING = CACHED_MAPPING + "".join(
    f"""
[taps."layers.{{i}}.{tap}"]
function = "{function}"
within = "hf.model.layers.{{i}}.self_attn"
select = "[{item}]"
transform = {transform}
"""
    for tap, function, item, transform in (
        ("q_rope", "transformers.models.qwen3.modeling_qwen3.apply_rotary_pos_emb", 0, '["transpose(1,2)"]'),
        ("k_rope", "transformers.models.qwen3.modeling_qwen3.apply_rotary_pos_emb", 1, '["transpose(1,2)"]'),
        ("k_cache", "transformers.cache_utils.Cache.update", 0, "[]"),
        ("v_cache", "transformers.cache_utils.Cache.update", 1, "[]"),
    )
)


def test_hfs_own_modules_map_with_a_model_output_rope_by_dotted_path_and_the_dynamic_cache(tmp_path, dense):
    (tmp_path / "hf_port.py").write_text(CACHED_PORT.replace("return out.logits", "return out"))
    (tmp_path / "hf.toml").write_text(HF_MAPPING)
    spec = f"module:{tmp_path / 'hf_port.py'}:load@{tmp_path / 'hf.toml'}"
    store = capture_store(spec, dense, "bfloat16", tmp_path / "port")
    assert sorted(store.missing_taps) == ["attn_probs", "attn_scores"]
    assert store.get(1, "layers.0.k_cache").shape[2] == len(PROMPT) + 1, "the whole cache after decode step 1"
    assert first_divergence(dense, spec, "bfloat16") is None


def test_a_forward_returning_no_logits_is_refused_in_one_sentence(tmp_path, dense):
    (tmp_path / "bad_port.py").write_text(CACHED_PORT.replace("return out.logits", "return out.past_key_values"))
    (tmp_path / "m.toml").write_text(CACHED_MAPPING)
    with pytest.raises(UserError, match="not logits: return the logits tensor"):
        capture_store(f"module:{tmp_path / 'bad_port.py'}:load@{tmp_path / 'm.toml'}", dense, "float32", tmp_path / "s")


# ---- the mapping grammar: selectors, tensor methods, shared modules, arithmetic, layouts, dtypes ----


class SharedRope(torch.nn.Module):
    """A toy port whose one `rope` module serves every layer, called for q then k (torchtune's style)."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.rope, self.layers = torch.nn.Identity(), layers

    def forward(self, x):
        for i in range(self.layers):
            self.rope(x + 2 * i), self.rope(x + 2 * i + 1)
        probs = x.softmax(dim=-1)
        return torch.topk(probs, 2, dim=-1)


def record(model, taps: dict[str, TapOrigin], x):
    from qwen3dbg.candidates.module_adapter import Mapping, _Recorder

    mapping = Mapping(taps, False, None, None, Path("toy.toml"))
    values = {}
    recorder = _Recorder(model, sys.modules[__name__], mapping, set(taps), values.__setitem__)
    with recorder.active():
        model(x)
    recorder.check_counts()
    return values


def test_a_shared_module_gives_each_layer_its_own_call():
    x = torch.zeros(1, 2, 4)
    taps = {
        f"layers.{i}.{op}": TapOrigin(module="rope", call=2 * i + (op == "k_rope"))
        for i in range(3)
        for op in ("q_rope", "k_rope")
    }
    values = record(SharedRope(), taps, x)
    assert [float(values[f"layers.{i}.{op}"][0, 0, 0]) for i in range(3) for op in ("q_rope", "k_rope")] == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]


def test_a_module_running_more_often_than_mapped_is_refused_naming_it():
    with pytest.raises(UserError, match=r"module 'rope' ran 6 times in one step, but the mapping takes 1"):
        record(SharedRope(), {"layers.0.q_rope": TapOrigin(module="rope")}, torch.zeros(1, 2, 4))
    assert record(SharedRope(), {"layers.0.q_rope": TapOrigin(module="rope", calls=6)}, torch.zeros(1, 2, 4))


@pytest.mark.parametrize("select", ["[1]", ".indices"])
def test_a_tuple_output_is_selected_by_index_or_attribute(select):
    x = torch.randn(1, 2, 4)
    values = record(SharedRope(), {"layers.0.moe.topk_ids": TapOrigin(function="torch.topk", select=select)}, x)
    assert torch.equal(values["layers.0.moe.topk_ids"], torch.topk(x.softmax(-1), 2, dim=-1).indices)


@pytest.mark.parametrize(
    "source, complaint",
    [
        (TapOrigin(module="rope", input=3, calls=6), r"layers\.0\.q_rope takes positional input 3 of module 'rope'"),
        (TapOrigin(function="torch.topk", select=".nope"), r"layers\.0\.q_rope: select = '\.nope' does not apply"),
        (TapOrigin(function="torch.topk", select="[2]"), r"layers\.0\.q_rope: select = '\[2\]' does not apply"),
    ],
)
def test_taking_what_a_call_does_not_have_names_the_tap(source, complaint):
    with pytest.raises(UserError, match=complaint):
        record(SharedRope(), {"layers.0.q_rope": source}, torch.zeros(1, 2, 4))


def test_a_tensor_method_is_tapped_and_put_back():
    x = torch.randn(1, 2, 4)
    values = record(SharedRope(), {"layers.0.attn_probs": TapOrigin(function="torch.Tensor.softmax")}, x)
    assert torch.equal(values["layers.0.attn_probs"], torch.softmax(x, -1))
    assert "softmax" not in vars(torch.Tensor), "the wrapper is removed, not left over the inherited method"


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("nH/nKV", lambda c, i: c.n_rep),
        ("nH//nKV", lambda c, i: c.n_rep),
        ("(nH+2*nKV)*D", lambda c, i: (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim),
        ("2*i+1", lambda c, i: 2 * i + 1),
    ],
)
def test_counts_are_integer_expressions_over_the_layer_and_the_model_sizes(tmp_path, expr, expected):
    cfg = load_config_like()
    (tmp_path / "m.toml").write_text(f'[taps]\n"layers.{{i}}.q_rope" = {{ module = "x", calls = "{expr}" }}')
    taps = load_mapping(tmp_path / "m.toml", cfg).taps
    layers = range(cfg.num_hidden_layers)
    assert [taps[f"layers.{i}.q_rope"].calls for i in layers] == [expected(cfg, i) for i in layers]


def test_a_transform_divides_exactly():
    cfg = load_config_like()
    grouped = apply_transforms(
        torch.zeros(1, 3, cfg.num_attention_heads, cfg.head_dim),
        ("reshape(B,T,nKV,nH/nKV,D)",),
        axis_sizes(cfg, 1, 3, 3),
    )
    assert grouped.shape == (1, 3, cfg.num_key_value_heads, cfg.n_rep, cfg.head_dim)


@pytest.mark.parametrize("transform", ["reshape(B,T,nH/3,D)", "slice(-1,0,I/0)"])
def test_a_size_that_is_not_a_whole_number_is_refused(tmp_path, transform):
    (tmp_path / "m.toml").write_text(f'[taps]\nembed = {{ module = "tok_emb", transform = ["{transform}"] }}')
    with pytest.raises(UserError, match="is not transpose"):
        load_mapping(tmp_path / "m.toml", load_config_like())


LAYOUT_MISTAKES = {  # mapping line edited -> what the error must name
    (
        '"layers.{i}.q_norm" = { module = "trf_blocks.{i}.att.q_norm", transform = ["transpose(1,2)"] }',
        '"layers.{i}.q_norm" = "trf_blocks.{i}.att.q_norm"',
    ): r"layers\.0\.q_norm comes out .* \[B, T, nH, D\]",
    (
        'transform = ["reshape(B,S,nKV,D)", "transpose(1,2)"]',
        'transform = ["reshape(B,S,nH,D)", "transpose(1,2)"]',
    ): r"layers\.0\.v_cache: the transforms .* fail .* \[B, nKV, S, D\]",
    (
        '"layers.{i}.mlp.gate" = "trf_blocks.{i}.ff.fc1"',
        '"layers.{i}.mlp.gate" = { module = "trf_blocks.{i}.ff.fc1", select = "[0]" }',
    ): r"layers\.0\.mlp\.gate comes out .* \[B, T, I\]",
}


@pytest.mark.parametrize("edit", list(LAYOUT_MISTAKES), ids=["no-transpose", "wrong-reshape", "indexed-tensor"])
def test_a_layout_mistake_is_caught_by_the_trial_forward_naming_tap_and_layout(tmp_path, dense, edit):
    text = MAPPING.read_text()
    assert edit[0] in text
    (tmp_path / "m.toml").write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(UserError, match=LAYOUT_MISTAKES[edit]):
        load_candidate(f"{PORT}@{tmp_path / 'm.toml'}", dense, "float32")


def test_a_function_shared_by_all_layers_taken_by_call_index(tmp_path, dense):
    """apply_rope without `within`: calls 2i and 2i+1 of the step are layer i's queries and keys."""
    text = (
        MAPPING.read_text()
        .replace('within = "trf_blocks.{i}.att", call = 0', 'call = "2*i"')
        .replace('within = "trf_blocks.{i}.att", call = 1', 'call = "2*i+1"')
    )
    (tmp_path / "m.toml").write_text(text)
    spec = f"{PORT}@{tmp_path / 'm.toml'}"
    assert first_divergence(dense, spec, "float32") is None
    unscoped = MAPPING.read_text().replace(
        'function = "apply_rope", within = "trf_blocks.{i}.att", ', 'function = "apply_rope", '
    )  # every layer takes calls 0 and 1
    (tmp_path / "bad.toml").write_text(unscoped)
    with pytest.raises(UserError, match=r"function 'apply_rope' ran 6 times in one step, but the mapping takes 2"):
        load_candidate(f"{PORT}@{tmp_path / 'bad.toml'}", dense, "float32")


def test_taps_keep_the_dtype_the_port_computed_them_in(dense):
    """The standalone port's softmax runs in float32: its probabilities are stored so, not rounded to bf16."""
    from qwen3dbg.run.capture import run_steps

    taps = run_steps(load_candidate(PORT, dense, "bfloat16"), STEPS[:1])[0]
    assert taps["layers.0.attn_probs"].dtype == torch.float32
    assert taps["layers.0.q_proj"].dtype == torch.bfloat16


LITGPT_MAPPING = Path(__file__).resolve().parents[2] / "candidates" / "mappings" / "litgpt_qwen3.toml"


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_a_layer_key_covers_only_the_layers_that_have_the_op(preset):
    from qwen3dbg.model.synth import PRESETS
    from qwen3dbg.tapstore.schema import step_taps

    cfg = PRESETS[preset].config
    mapped = set(load_mapping(LITGPT_MAPPING, cfg).taps)
    schema = {t.name for t in step_taps(cfg, 1, 1, 1) if t.op not in ("attn_scores", "attn_probs")}
    assert mapped == schema
