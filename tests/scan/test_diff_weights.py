"""diff-weights: a checkpoint against its own GGUF conversion, clean and with planted differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rewrite_checkpoint

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.gguf_io import GGUF_TYPES, write_gguf
from qwen3dbg.model.synth import PRESETS
from qwen3dbg.scan.diff import diff_weights, rope_permute, rope_unpermute

L1 = "model.layers.1."


@pytest.mark.parametrize("gguf_type", list(GGUF_TYPES))
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_own_gguf_conversion_differs_only_by_rounding(models, tmp_path, preset, gguf_type):
    result = diff_weights(models(preset), write_gguf(models(preset), tmp_path / "m.gguf", gguf_type), fail_on="warning")
    assert result.exit_code == 0
    assert not result.only_a and not result.only_b
    assert {d.relation for d in result.tensors} <= {"equal", "rounding"}
    if gguf_type in ("f32", "bf16"):  # the checkpoint is bf16: both hold its values exactly
        assert {d.relation for d in result.tensors} == {"equal"}


def test_dropped_reshaped_and_changed_tensors_are_named(models, tmp_path):
    src = models("tiny-moe")

    def edit(t):
        del t[L1 + "self_attn.v_proj.weight"]
        t[L1 + "self_attn.o_proj.weight"] = t[L1 + "self_attn.o_proj.weight"].reshape(-1, 32)
        w = t[L1 + "mlp.experts.3.up_proj.weight"].clone()
        w[5, 7] += 0.1 * w.float().abs().max().to(w.dtype)  # far above Q8_0's rounding (about 0.4% of absmax)
        t[L1 + "mlp.experts.3.up_proj.weight"] = w
        return t

    changed = write_gguf(rewrite_checkpoint(src, tmp_path / "edited", edit), tmp_path / "m.gguf", "q8_0")
    result = diff_weights(src, changed)
    named = {(f.check, f.tensor) for f in result.findings if f.severity == "error"}
    assert named == {
        ("missing", L1 + "self_attn.v_proj.weight"),
        ("reshaped", L1 + "self_attn.o_proj.weight"),
        ("changed", L1 + "mlp.experts.3.up_proj.weight"),
    }
    assert result.exit_code == 1
    (f,) = [f for f in result.findings if f.check == "changed"]
    ratio = f.numbers["max_abs_diff"] / float(
        Checkpoint(src).get(L1 + "mlp.experts.3.up_proj.weight").float().abs().max()
    )
    assert f"{ratio:.3g}x A's absmax" in f.message  # a multiple, never a bare "49.9 of its absmax"


def test_llama_style_qk_permutation_is_recognised(models, tmp_path):
    cfg = PRESETS["tiny-dense"].config
    src = models("tiny-dense")
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}

    def permute(t):
        for p, n in heads.items():
            name = L1 + f"self_attn.{p}.weight"
            t[name] = torch.from_numpy(rope_permute(t[name].float().numpy(), n)).to(t[name].dtype)
        return t

    result = diff_weights(
        src, write_gguf(rewrite_checkpoint(src, tmp_path / "perm", permute), tmp_path / "m.gguf", "f16")
    )
    relations = {d.name: d.relation for d in result.tensors if d.relation not in ("equal", "rounding")}
    assert relations == {L1 + "self_attn.q_proj.weight": "permuted", L1 + "self_attn.k_proj.weight": "permuted"}


def test_rope_unpermute_inverts_rope_permute():
    w = np.arange(8 * 32 * 3, dtype=np.float32).reshape(8 * 32, 3)
    p = rope_permute(w, 8)
    assert not np.array_equal(p, w) and np.array_equal(rope_unpermute(p, 8), w)
    # the first head's rows: x0, y0, x1, y1, ... with x the first half and y the second
    assert list(p[:4, 0] // 3) == [0, 16, 1, 17]


def test_identical_checkpoints_are_equal(models):
    result = diff_weights(models("tiny-dense"), models("tiny-dense"))
    assert result.findings == [] and {d.relation for d in result.tensors} == {"equal"}
