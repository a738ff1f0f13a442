"""The tap schema `qwen3dbg-taps/1`: every tap's name, forward order and shape. Everything imports it;
docs/taps.md is its public description for engines in other languages."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from math import prod
from typing import Iterator

from qwen3dbg.model.config import Qwen3Config

# A tap is one intermediate tensor of one forward step. Step 0 is the prefill (T = prompt length), each later
# step decodes one token (T = 1) with a KV cache holding S positions after the step.
FORMAT = "qwen3dbg-taps/1"
#: the file that makes a directory a tap store (here, not in store.py, so the torch-free scanner can tell one)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class OpSpec:
    """One op of the schema: `layers.{i}.{op}` inside a layer, or a bare name outside the layers."""

    op: str
    axes: tuple[str, ...]
    where: str = "all"  # "all", "dense" (dense FFN layers) or "moe" (sparse FFN layers)
    integer: bool = False
    doc: str = ""
    #: the checkpoint module whose weight the op applies, inside its layer (`self_attn.q_proj`), or global
    #: (`lm_head`); "" for ops without one. The one op-to-weight map: the diagnosis and the scan read it.
    module: str = ""


LAYER_OPS: tuple[OpSpec, ...] = (
    OpSpec("attn_norm", ("B", "T", "H"), module="input_layernorm", doc="input_layernorm output"),
    OpSpec("q_proj", ("B", "T", "nH*D"), module="self_attn.q_proj"),
    OpSpec("k_proj", ("B", "T", "nKV*D"), module="self_attn.k_proj"),
    OpSpec("v_proj", ("B", "T", "nKV*D"), module="self_attn.v_proj"),
    OpSpec("q_norm", ("B", "T", "nH", "D"), module="self_attn.q_norm", doc="per-head RMSNorm over head_dim"),
    OpSpec("k_norm", ("B", "T", "nKV", "D"), module="self_attn.k_norm"),
    OpSpec("q_rope", ("B", "T", "nH", "D")),
    OpSpec("k_rope", ("B", "T", "nKV", "D")),
    # the cache and attention matrices: the taps an external engine most often leaves out (docs/taps.md, (*))
    OpSpec("k_cache", ("B", "nKV", "S", "D"), doc="keys as the cache holds them after this step"),
    OpSpec("v_cache", ("B", "nKV", "S", "D")),
    OpSpec("attn_scores", ("B", "nH", "T", "S"), doc="scaled pre-softmax scores, masked -inf"),
    OpSpec("attn_probs", ("B", "nH", "T", "S")),
    OpSpec("attn_out", ("B", "T", "nH*D"), doc="context, heads concatenated, before o_proj"),
    OpSpec("o_proj", ("B", "T", "H"), module="self_attn.o_proj"),
    OpSpec("resid_mid", ("B", "T", "H"), doc="residual + attention"),
    OpSpec("mlp_norm", ("B", "T", "H"), module="post_attention_layernorm", doc="post_attention_layernorm output"),
    OpSpec("mlp.gate", ("B", "T", "I"), module="mlp.gate_proj", where="dense"),
    OpSpec("mlp.up", ("B", "T", "I"), module="mlp.up_proj", where="dense"),
    OpSpec("mlp.act", ("B", "T", "I"), where="dense", doc="silu(gate) * up"),
    OpSpec("moe.router_logits", ("B", "T", "E"), module="mlp.gate", where="moe"),
    OpSpec("moe.topk_ids", ("B", "T", "k"), where="moe", integer=True, doc="int64 (or int32), by descending weight"),
    OpSpec("moe.topk_weights", ("B", "T", "k"), where="moe"),
    OpSpec("mlp.out", ("B", "T", "H"), module="mlp.down_proj", doc="FFN output: dense down_proj or the MoE mixture"),
    OpSpec("resid_out", ("B", "T", "H")),
)
HEAD_OPS = (OpSpec("embed", ("B", "T", "H"), module="model.embed_tokens"),)
TAIL_OPS = (
    OpSpec("final_norm", ("B", "T", "H"), module="model.norm"),
    OpSpec("logits", ("B", "T", "V"), module="lm_head"),
)
OPS_BY_NAME = {o.op: o for o in HEAD_OPS + LAYER_OPS + TAIL_OPS}


@dataclass(frozen=True)
class TapSpec:
    name: str
    op: str
    layer: int | None
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    integer: bool = False

    @property
    def numel(self) -> int:
        return prod(self.shape)


def axis_sizes(cfg: Qwen3Config, batch: int, tokens: int, cache_len: int) -> dict[str, int]:
    d = cfg.head_dim
    return {
        "B": batch,
        "T": tokens,
        "S": cache_len,
        "H": cfg.hidden_size,
        "nH": cfg.num_attention_heads,
        "nKV": cfg.num_key_value_heads,
        "D": d,
        "nH*D": cfg.num_attention_heads * d,
        "nKV*D": cfg.num_key_value_heads * d,
        "I": cfg.intermediate_size,
        "E": cfg.num_experts,
        "k": cfg.num_experts_per_tok,
        "V": cfg.vocab_size,
    }


def layer_ops(cfg: Qwen3Config, layer: int) -> tuple[OpSpec, ...]:
    kind = "moe" if cfg.is_moe_layer(layer) else "dense"
    return tuple(o for o in LAYER_OPS if o.where in ("all", kind))


def tap_name(op: str, layer: int | None) -> str:
    return op if layer is None else f"layers.{layer}.{op}"


_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def parse_tap_name(name: str) -> tuple[int | None, str]:
    """`layers.3.q_rope` -> (3, 'q_rope'); `logits` -> (None, 'logits')."""
    m = _NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


#: the taps each op reads (within its layer; "prev" is the previous layer's resid_out, or embed)
_INPUTS = {
    "attn_norm": ("prev",),
    "q_proj": ("attn_norm",),
    "k_proj": ("attn_norm",),
    "v_proj": ("attn_norm",),
    "q_norm": ("q_proj",),
    "k_norm": ("k_proj",),
    "q_rope": ("q_norm",),
    "k_rope": ("k_norm",),
    "k_cache": ("k_rope",),
    "v_cache": ("v_proj",),
    "attn_scores": ("q_rope", "k_cache"),
    "attn_probs": ("attn_scores",),
    "attn_out": ("attn_probs", "v_cache"),
    "o_proj": ("attn_out",),
    "resid_mid": ("prev", "o_proj"),
    "mlp_norm": ("resid_mid",),
    "mlp.gate": ("mlp_norm",),
    "mlp.up": ("mlp_norm",),
    "mlp.act": ("mlp.gate", "mlp.up"),
    "moe.router_logits": ("mlp_norm",),
    "moe.topk_ids": ("moe.router_logits",),
    "moe.topk_weights": ("moe.router_logits",),
    "resid_out": ("resid_mid", "mlp.out"),
}


def inputs_of(name: str, cfg: Qwen3Config) -> list[str]:
    """Tap names an op reads: `layers.2.q_norm` -> [`layers.2.q_proj`]; `layers.0.attn_norm` -> [`embed`]."""
    layer, op = parse_tap_name(name)
    last = tap_name("resid_out", cfg.num_hidden_layers - 1) if cfg.num_hidden_layers else "embed"
    if layer is None:
        return {"final_norm": [last], "logits": ["final_norm"]}.get(op, [])
    prev = layer_input(layer)
    if op == "mlp.out":
        ops = ("moe.topk_weights", "mlp_norm") if cfg.is_moe_layer(layer) else ("mlp.act",)
    else:
        ops = _INPUTS[op]
    return [prev if o == "prev" else tap_name(o, layer) for o in ops]


def layer_input(layer: int) -> str:
    return "embed" if layer == 0 else tap_name("resid_out", layer - 1)


def _spec(o: OpSpec, layer: int | None, sizes: dict[str, int]) -> TapSpec:
    # A layer of Qwen3-MoE that is dense (mlp_only_layers) uses intermediate_size, like HF.
    return TapSpec(tap_name(o.op, layer), o.op, layer, tuple(sizes[a] for a in o.axes), o.axes, o.integer)


def iter_step_taps(cfg: Qwen3Config, batch: int, tokens: int, cache_len: int) -> Iterator[TapSpec]:
    """Every tap of one step, in forward order, with its concrete shape, one at a time (a config from a
    file may declare any number of layers: a reader stops when it has what it checks)."""
    sizes = axis_sizes(cfg, batch, tokens, cache_len)
    yield from (_spec(o, None, sizes) for o in HEAD_OPS)
    for layer in range(cfg.num_hidden_layers):
        yield from (_spec(o, layer, sizes) for o in layer_ops(cfg, layer))
    yield from (_spec(o, None, sizes) for o in TAIL_OPS)


def step_taps(cfg: Qwen3Config, batch: int, tokens: int, cache_len: int) -> list[TapSpec]:
    """Every tap of one step, in forward order, with its concrete shape."""
    return list(iter_step_taps(cfg, batch, tokens, cache_len))


def tap_spec(cfg: Qwen3Config, name: str, batch: int, tokens: int, cache_len: int) -> TapSpec | None:
    """The tap `name` of one step with its concrete shape, or None when this model has no such tap;
    found without listing the others."""
    layer, op = parse_tap_name(name)
    if layer is None:
        ops = HEAD_OPS + TAIL_OPS
    else:
        ops = layer_ops(cfg, layer) if layer < cfg.num_hidden_layers and name == tap_name(op, layer) else ()
    o = next((o for o in ops if o.op == op), None)
    return None if o is None else _spec(o, layer, axis_sizes(cfg, batch, tokens, cache_len))


def forward_index(cfg: Qwen3Config) -> dict[str, int]:
    """Position of every tap name in forward order (the differ's 'first' means smallest index)."""
    return {t.name: i for i, t in enumerate(step_taps(cfg, 1, 1, 1))}


def select(names: list[str], patterns: list[str] | None) -> list[str]:
    """Keep the names matching any glob (`layers.*.attn_*`, `logits`); None keeps all."""
    if not patterns:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
