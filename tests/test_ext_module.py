"""`--cand module:...`: a PyTorch port tapped through a TOML mapping (the shipped standalone port)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DECODE, PROMPT, first_divergence
from qwen3dbg.candidates.module_adapter import RERUN_NOTE, apply_transforms, load_mapping
from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.config import load_config
from qwen3dbg.errors import UserError
from qwen3dbg.registry import load_candidate
from qwen3dbg.store import TapStore
from qwen3dbg.taps import axis_sizes
from qwen3dbg.validate import validate_store

PORT = "module:qwen3dbg.candidates.ports.standalone_qwen3:load"
MAPPING = Path(__file__).resolve().parents[1] / "candidates" / "mappings" / "standalone_qwen3.toml"
STEPS = forced_steps(PROMPT, DECODE)


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


def capture_store(spec: str, model: Path, dtype: str, out: Path) -> TapStore:
    capture(load_candidate(spec, model, dtype), STEPS, out)
    return TapStore.open(out)


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
    assert store.steps[2].cache_positions == [len(STEPS[0].token_ids[0]) + 1]  # the slot decode step 2 wrote
    assert store.get(2, "layers.0.k_cache").shape[2] == 1
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


def test_transforms_slice_a_fused_gate_up_and_move_head_axes():
    cfg = load_config_like()
    sizes = axis_sizes(cfg, 2, 3, 3)
    gate, up = torch.randn(2, 3, cfg.intermediate_size), torch.randn(2, 3, cfg.intermediate_size)
    fused = torch.cat((gate, up), dim=-1)
    assert torch.equal(apply_transforms(fused, ("slice(-1,0,I)",), sizes), gate)
    assert torch.equal(apply_transforms(fused, ("slice(-1,I,2*I)",), sizes), up)
    heads = torch.randn(2, cfg.num_attention_heads, 3, cfg.head_dim)  # [B, nH, T, D]
    flat = apply_transforms(heads, ("transpose(1,2)", "reshape(B,T,nH*D)"), sizes)
    assert torch.equal(flat[1, 2, cfg.head_dim:2 * cfg.head_dim], heads[1, 1, 2])


def load_config_like():
    from qwen3dbg.synth import PRESETS

    return PRESETS["tiny-dense"].config


@pytest.mark.parametrize("text,complaint", [
    ('[taps]\n"layers.{i}.nope" = "x"', "not a tap name"),
    ('[taps]\nembed = { module = "tok_emb", function = "f" }', "exactly one of module/function"),
    ('[taps]\nembed = { module = "tok_emb", transform = ["flip(0)"] }', "is not transpose"),
    ('[taps]\nembed = { module = "tok_emb", transform = ["reshape(B,Q)"] }', "is not transpose"),
    ('[call]\nkv_cache = true\n[taps]\nembed = "tok_emb"', "reset"),
    ("[taps", "not valid TOML"),
])
def test_a_bad_mapping_is_explained_in_one_sentence(tmp_path, text, complaint):
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(UserError, match=complaint):
        load_mapping(tmp_path / "m.toml", load_config_like())


def test_a_mapping_naming_a_module_the_port_lacks_is_a_user_error(tmp_path, dense):
    text = MAPPING.read_text().replace('"trf_blocks.{i}.ff.fc1"', '"trf_blocks.{i}.ff.gate_proj"')
    (tmp_path / "m.toml").write_text(text)
    cand = load_candidate(f"{PORT}@{tmp_path / 'm.toml'}", dense, "float32")
    with pytest.raises(UserError, match="gate_proj"):
        capture(cand, STEPS[:1], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is False


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
CACHED_MAPPING = '''
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
'''


def test_port_with_its_own_cache_and_a_partial_mapping_runs_step_by_step(tmp_path, dense):
    (tmp_path / "cached_port.py").write_text(CACHED_PORT)
    (tmp_path / "cached.toml").write_text(CACHED_MAPPING)
    spec = f"module:{tmp_path / 'cached_port.py'}:load@{tmp_path / 'cached.toml'}"
    store = capture_store(spec, dense, "bfloat16", tmp_path / "port")
    assert sorted(store.missing_taps) == ["attn_probs", "attn_scores", "k_cache", "k_rope", "q_rope", "v_cache"]
    assert store.get(1, "layers.0.k_proj").shape[1] == 1, "a decode step feeds the port one token"
    assert store.manifest["notes"] == []
    assert first_divergence(dense, spec, "bfloat16") is None
