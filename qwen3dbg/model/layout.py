"""The on-disk layout of a released Qwen3 checkpoint: its file names, its index, every tensor's name and shape.

Torch-free, so the checkpoint scanner reads a safetensors checkpoint without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.util.jsonio import read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SUFFIX = ".safetensors"
#: far above any Qwen3 file (the largest release, 480B, has about 37k tensors in all its shards together);
#: a file listing more is not a checkpoint, and reading its table would cost seconds and gigabytes
MAX_TENSORS = 1 << 17

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


class BadIndex(ValueError):
    """The index cannot be used; the message says why in one sentence."""


def shard_problem(name) -> str | None:
    """Why an index entry is not a shard qwen3dbg reads, or None: shards are plain `*.safetensors` file
    names inside the model directory (never a path out of it, never a pickle that would be unpickled)."""
    if not isinstance(name, str):
        return "not a file name"
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return "not a file in the model directory"
    if not name.endswith(SUFFIX):
        return "not a safetensors file: qwen3dbg loads safetensors only, convert the checkpoint"
    return None


def read_weight_map(model_dir: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name; BadIndex (or the JSON reader's ValueError, or OSError)
    when it is not one."""
    raw = read_json(model_dir / INDEX)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise BadIndex("it has no weight_map object of tensor names to shard file names")
    for tensor, shard in weight_map.items():
        if problem := shard_problem(shard):
            raise BadIndex(f"it places {tensor} in {shard!r}, which is {problem}")
    return weight_map


@dataclass(frozen=True)
class Held:
    """The layers, and per layer the experts, that a checkpoint's tensor names hold."""

    layers: set[int] = field(default_factory=set)
    experts: dict[int, set[int]] = field(default_factory=dict)

    @staticmethod
    def of(hf_names: Iterable[str]) -> "Held":
        held = Held()
        for name in hf_names:
            if m := _EXPERT.match(name):
                held.experts.setdefault(int(m[1]), set()).add(int(m[2]))
            if m := _LAYER.match(name):
                held.layers.add(int(m[1]))
        return held


def _mismatch(declared: int, held: set[int]) -> str | None:
    """Why the indices `held` are not exactly 0..declared-1, or None when they are."""
    if len(held) == declared and (not held or max(held) == declared - 1):
        return None
    beyond = min((i for i in held if i >= declared), default=None)
    if beyond is not None:
        return f"{beyond} is beyond them"
    return f"{next(i for i in range(declared) if i not in held)} is absent"  # within len(held) + 1 steps


def count_problems(cfg: Qwen3Config, held: Held) -> list[tuple[str, str, dict]]:
    """(kind, sentence, numbers) for each count the config declares that the tensors contradict: layers,
    and experts per sparse layer. Checked before expected tensors are listed, whose number the config
    alone would set (a config may declare a billion layers)."""
    out = []
    n = cfg.num_hidden_layers
    if why := _mismatch(n, held.layers):
        out.append(
            (
                "layers",
                f"config declares {n} layers but the weights hold {len(held.layers)} (layer {why})",
                {"layers": len(held.layers), "expected": n},
            )
        )
    if cfg.is_moe:
        e = cfg.num_experts
        for layer in sorted(i for i in held.layers if i < n and cfg.is_moe_layer(i)):
            have = held.experts.get(layer, set())
            if why := _mismatch(e, have):
                out.append(
                    (
                        "experts",
                        f"config declares {e} experts per sparse layer but layer {layer} holds "
                        f"{len(have)} (expert {why})",
                        {"layer": layer, "experts": len(have), "expected": e},
                    )
                )
    return out


def _indices(declared: int, held: set[int] | None) -> list[int]:
    """The layer or expert numbers to list: all declared ones, or with `held` those below its size and
    those it holds, so a gap shows tensor by tensor and the cost stays that of what the files hold."""
    if held is None:
        return list(range(declared))
    return sorted(set(range(min(declared, len(held)))) | {i for i in held if i < declared})


def tensor_shapes(cfg: Qwen3Config, ghost_bias: bool = False, held: Held | None = None) -> dict[str, tuple[int, ...]]:
    """The on-disk names and shapes of a released checkpoint of this config, in a stable order.

    With `held`, only layers and experts within what the checkpoint holds (`count_problems` speaks of
    the others), so a config declaring a billion layers costs what the files hold."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layers = _indices(cfg.num_hidden_layers, None if held is None else held.layers)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in layers:
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
        }
        if ghost_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.bias": (h,),
            }
        if cfg.is_moe_layer(i):
            e_i = cfg.moe_intermediate_size
            experts = _indices(cfg.num_experts, None if held is None else held.experts.get(i, set()))
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in experts:
                shapes |= {
                    p + f"mlp.experts.{e}.gate_proj.weight": (e_i, h),
                    p + f"mlp.experts.{e}.up_proj.weight": (e_i, h),
                    p + f"mlp.experts.{e}.down_proj.weight": (h, e_i),
                }
        else:
            inter = cfg.intermediate_size
            shapes |= {
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
