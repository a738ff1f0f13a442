import json

import pytest
import torch

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import load_config
from qwen3dbg.model.layout import INDEX, tensor_shapes
from qwen3dbg.model.synth import Plants, make_model
from qwen3dbg.util.errors import UserError


def test_sharded_checkpoint_reads_like_the_single_file(models, tmp_path):
    sharded, single = Checkpoint(models("sharded")), Checkpoint(models("tiny-moe"))
    index = json.loads((sharded.dir / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(sharded.keys()) == sorted(single.keys())
    for name in single.keys():
        assert torch.equal(sharded.get(name), single.get(name)), name


def test_on_disk_names_and_shapes_are_those_of_released_checkpoints(models):
    for preset in ("tiny-dense", "tiny-moe"):
        ck = Checkpoint(models(preset))
        cfg = load_config(models(preset))
        expected = tensor_shapes(cfg)
        assert {n: ck.shape(n) for n in ck.keys()} == expected
        assert ("lm_head.weight" in ck) == (not cfg.tie_word_embeddings)
        if cfg.is_moe:
            assert ck.shape("model.layers.0.mlp.experts.7.down_proj.weight") == (
                cfg.hidden_size,
                cfg.moe_intermediate_size,
            )
            assert ck.shape("model.layers.0.mlp.gate.weight") == (cfg.num_experts, cfg.hidden_size)


def test_weights_are_realistic_and_k_norm_reaches_tens_early(models):
    ck = Checkpoint(models("tiny-dense"))
    k0 = ck.get("model.layers.0.self_attn.k_norm.weight", torch.float32)
    k2 = ck.get("model.layers.2.self_attn.k_norm.weight", torch.float32)
    assert k0.max() >= 10 and k2.max() < k0.max()
    norm = ck.get("model.layers.1.input_layernorm.weight", torch.float32)
    assert 0.5 < norm.median() < 1.5 and norm.std() > 0.05


def test_make_model_is_deterministic_and_checkpoint_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    again = make_model(tmp_path / "again", "tiny-moe")
    a, b = Checkpoint(models("tiny-moe")), Checkpoint(again)
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.keys())
    hf = AutoModelForCausalLM.from_pretrained(models("tiny-moe"), dtype=torch.float32)
    fused = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(fused[3, 48:], a.get("model.layers.1.mlp.experts.3.up_proj.weight", torch.float32))


def test_planted_anomalies_are_on_disk(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    d = make_model(tmp_path, "tiny-dense", plants=Plants(ghost_bias=1e30, nonfinite=(name,), k_norm_peak=96.5))
    ck = Checkpoint(d)
    assert not load_config(d).attention_bias and "model.layers.2.self_attn.o_proj.bias" in ck
    assert ck.get("model.layers.0.self_attn.q_proj.bias", torch.float32).abs().max() > 1e29
    up = ck.get(name, torch.float32)
    assert up.isnan().any() and up.isinf().any()
    assert ck.get("model.layers.0.self_attn.k_norm.weight", torch.float32).max() == 96.5


def test_missing_shard_and_missing_weights_are_clear_errors(models, tmp_path):
    d = make_model(tmp_path / "m", "tiny-moe", shard_bytes=50_000)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UserError, match="missing"):
        Checkpoint(d)
    with pytest.raises(UserError, match="no model.safetensors"):
        Checkpoint(tmp_path)


def test_a_default_model_cached_by_another_generator_is_not_reused(tmp_path, monkeypatch):
    """The embedded default is cached; a cache left by an older generator (other weights) must not stand
    in for what make-model writes today, or stores captured on one would diverge on the other."""
    from qwen3dbg.model import synth

    monkeypatch.setattr(synth, "generator_digest", lambda: "an-older-one")
    stale = synth.default_model_dir()
    Checkpoint(stale)  # it is a model ...
    target = next(stale.glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:-2] + b"\x00\x7f")  # ... whose last weight an older generator set
    monkeypatch.undo()
    today, fresh = Checkpoint(synth.default_model_dir()), Checkpoint(make_model(tmp_path / "fresh", "tiny-dense"))
    assert today.dir != stale
    assert all(torch.equal(today.get(n), fresh.get(n)) for n in fresh.keys())
