"""GGUF writer and reader: our own conversion round-trips within each format's rounding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import load_config
from qwen3dbg.model.gguf_io import GGUFDamaged, config_from_gguf, dequantize, read_gguf, write_gguf
from qwen3dbg.model.gguf_names import gguf_shapes, gguf_to_hf, hf_to_gguf
from qwen3dbg.model.layout import tensor_shapes
from qwen3dbg.model.synth import PRESETS
from qwen3dbg.util.errors import UserError


def _q8_0_bound(ref: np.ndarray) -> np.ndarray:
    """Q8_0 stores round(x/d) with d = amax/127 as f16: error <= d/2 + 127*|d - f16(d)| per 32-block."""
    blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True)
    return np.broadcast_to(blocks * (1 / 254 + 2.0**-11) * (1 + 2.0**-20), (blocks.shape[0], 32)).reshape(ref.shape)


BOUND = {
    "f32": lambda ref: np.zeros_like(ref),
    "bf16": lambda ref: np.zeros_like(ref),  # the checkpoint is bf16: both are the same bits
    "f16": lambda ref: np.full_like(ref, 2.0**-25),  # bf16 -> f16 is exact except below f16's normal range
    "q8_0": _q8_0_bound,
}


@pytest.fixture(params=["tiny-dense", "tiny-moe"])
def model(request, models):
    return models(request.param)


def _read(g, t) -> np.ndarray:
    raw = np.fromfile(g.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
    return dequantize(raw, t.qtype, t.shape)


@pytest.mark.parametrize("gguf_type", list(BOUND))
def test_every_tensor_round_trips_within_the_formats_rounding(model, gguf_type, tmp_path):
    g = read_gguf(write_gguf(model, tmp_path / "m.gguf", gguf_type))
    cfg, ckpt = load_config(model), Checkpoint(model)
    seen = set()
    for t in g.tensors:
        names = gguf_to_hf(t.name, cfg.num_experts)
        ref = torch.stack([ckpt.get(n) for n in names]) if len(names) > 1 else ckpt.get(names[0])
        ref = ref.float().numpy()
        got = _read(g, t)
        # norms and the router stay F32 as in llama.cpp's converter, so they are exact in every type
        bound = np.zeros_like(ref) if t.type_name == "F32" else BOUND[gguf_type](ref)
        assert np.all(np.abs(got - ref) <= bound), t.name
        seen.update(names)
    assert seen == set(ckpt.keys())


def test_metadata_describes_the_config_llama_cpp_needs(model, tmp_path):
    g = read_gguf(write_gguf(model, tmp_path / "m.gguf", "bf16"))
    cfg = load_config(model)
    assert config_from_gguf(g) == cfg.replace(
        torch_dtype="bfloat16", max_position_embeddings=cfg.max_position_embeddings
    )
    arch = g.kv["general.architecture"]
    assert arch == {"qwen3": "qwen3", "qwen3_moe": "qwen3moe"}[cfg.model_type]
    assert g.kv[f"{arch}.attention.key_length"] == cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    assert len(g.kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert g.kv["tokenizer.ggml.model"] == "gpt2" and g.kv["tokenizer.ggml.merges"]


def test_tensor_table_matches_the_configs_gguf_names_and_shapes(model, tmp_path):
    g = read_gguf(write_gguf(model, tmp_path / "m.gguf", "f16"))
    expected = gguf_shapes(tensor_shapes(load_config(model)))
    assert {t.name: t.shape for t in g.tensors} == expected


def test_names_map_back_and_forth():
    cfg = PRESETS["tiny-moe"].config
    for hf in tensor_shapes(cfg, ghost_bias=True):
        g, e = hf_to_gguf(hf)
        assert gguf_to_hf(g, cfg.num_experts)[e or 0] == hf


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_a_truncated_header_is_reported_as_damage(model, tmp_path, cut):
    p = write_gguf(model, tmp_path / "m.gguf", "f16")
    data = p.read_bytes()
    header_end = read_gguf(p).data_start
    p.write_bytes(data[: cut if cut > 0 else header_end + cut])
    with pytest.raises(GGUFDamaged):
        read_gguf(p)


def test_our_parser_agrees_with_the_gguf_packages_reader(model, tmp_path):
    import gguf

    p = write_gguf(model, tmp_path / "m.gguf", "q8_0")
    ours, theirs = read_gguf(p), gguf.GGUFReader(p)
    assert [(t.name, t.offset, t.nbytes, t.qtype) for t in ours.tensors] == [
        (t.name, t.data_offset, t.n_bytes, int(t.tensor_type)) for t in theirs.tensors
    ]
    assert set(ours.kv) == {k for k in theirs.fields if not k.startswith("GGUF.")}  # it lists the header too


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("llama-cpp-python is not installed: cannot load the GGUF in llama.cpp")
    return llama_cpp


@pytest.mark.parametrize("gguf_type", list(BOUND))
def test_llama_cpp_loads_and_runs_every_type_we_write(model, gguf_type, tmp_path):
    llama_cpp = _llama_cpp()
    cfg = load_config(model)
    llm = llama_cpp.Llama(
        model_path=str(write_gguf(model, tmp_path / "m.gguf", gguf_type)),
        n_ctx=32,
        logits_all=True,
        verbose=False,
        n_threads=1,
    )
    llm.eval([5, 17, 99])
    assert llm.n_vocab() == cfg.vocab_size
    assert np.isfinite(np.asarray(llm.scores[:3])).all()


def test_metadata_that_is_no_valid_qwen3_config_is_damage():
    from types import SimpleNamespace

    kv = {
        "general.architecture": "qwen3",
        "qwen3.embedding_length": 64,
        "qwen3.attention.head_count": 4,
        "qwen3.attention.head_count_kv": 3,
        "qwen3.feed_forward_length": 160,
        "qwen3.block_count": 2,
        "qwen3.vocab_size": 512,
    }
    with pytest.raises(GGUFDamaged, match="not a multiple"):
        config_from_gguf(SimpleNamespace(kv=kv, tensors=[]))


def test_a_checkpoint_missing_an_experts_tensor_is_refused_not_stacked_short(models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = models("tiny-moe")
    last = load_config(src).num_experts - 1  # the hard case: no gap in the ids shows it is missing
    dst = tmp_path / "model"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            tensors.pop(f"model.layers.0.mlp.experts.{last}.up_proj.weight", None)
            save_file(tensors, dst / f.name, metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    with pytest.raises(
        UserError,
        match=f"blk.0.ffn_up_exps.weight: the checkpoint has {last} experts' tensors, "
        f"not the config's experts 0..{last}",
    ):
        write_gguf(dst, tmp_path / "m.gguf")
