"""vLLM's Qwen3 / Qwen3-MoE modules tapped into the schema, one sequence cut out of the engine's flat token axis.

vLLM runs every scheduled sequence of a forward as one flat token axis; the sequence under test owns rows
`query_start_loc[i]:query_start_loc[i+1]`, i its index in the model runner's input batch (both read from the
engine's own metadata at each forward). What the model fuses or defers is brought back to docs/taps.md:
- q/k/v are slices of `qkv_proj`, gate/up of `gate_up_proj`;
- `q_norm`/`k_norm` are copied before `rotary_emb` rotates them in place, and q_rope/k_rope taken as the
  attention's inputs (one rotary module serves every layer, and every model of the process);
- the residual is deferred: layer i returns (mlp output, resid_mid) and layer i+1's `input_layernorm` adds
  them, so `resid_out` of layer i is the residual that norm returns (the final `norm`'s for the last layer);
- the MoE routing runs inside the experts' runner: its router's `select_experts` is wrapped (ids int32,
  listed here by descending weight);
- `k_cache`/`v_cache` are gathered from the paged cache through the sequence's block table right after
  the layer's attention wrote it; vLLM's fused CPU attention computes no score matrix (missing_taps);
- under tensor parallelism (a worker per rank, `ranks`), a RowParallelLinear that all-reduces (o_proj, a dense
  down_proj) gives its tap as this rank's partial sum, taken as it enters the all-reduce;
- logits exist only at the rows vLLM samples (the last scheduled token of each sequence): they are handed
  as `QueryRows` at those positions.
Every tensor is copied out of vLLM's buffers at the hook (they are reused and updated in place).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.diff.streams import CacheSlots, QueryRows
from qwen3dbg.tapstore.store import FULL_CACHE_BYTES, TapSink
from qwen3dbg.tapstore.schema import OPS_BY_NAME, step_taps, tap_name

#: ops vLLM's engine does not compute as tensors (its CPU attention kernel is fused)
MISSING = frozenset({"attn_scores", "attn_probs"})
#: the CPU attention layout (`layer.isa`) whose cache blocks `Recorder._cache` reads; others leave the cache out
CACHE_LAYOUT = "vec"


def cache_layout(model) -> str:
    """The layout of vLLM's CPU KV cache blocks (its attention backend's `isa`)."""
    return getattr(model.model.layers[0].self_attn.attn, "isa", CACHE_LAYOUT)


def _copy(x: torch.Tensor) -> torch.Tensor:
    """A plain (not inference-mode) copy: vLLM runs the model under torch.inference_mode."""
    with torch.inference_mode(False):
        return x.clone()


@dataclass
class StepCapture:
    """The taps of one step (prefill or decode) of the sequence under test, over however many forwards it
    takes: a forward that computes exactly the step's positions hands its taps on as they come; otherwise
    (chunks, a cached prefix) rows are kept by position and handed on when the step ends."""

    sink: TapSink
    positions: list[int]
    cfg: Qwen3Config
    pieces: dict[str, list[tuple[list[int], torch.Tensor]]] = field(default_factory=dict)
    latest: dict[str, object] = field(default_factory=dict)  # cache taps: the last forward's
    computed: set[int] = field(default_factory=set)
    direct: bool = False
    last_logits: torch.Tensor | None = None  # [1,1,V] at the last position computed

    def begin_forward(self, positions: list[int]) -> None:
        self.direct = positions == self.positions and not self.pieces
        self.computed.update(positions)

    def put_rows(self, name: str, rows: torch.Tensor, positions: list[int]) -> None:
        """Rows [n, ...] of a token tap at `positions`."""
        if self.direct:
            self.sink(name, self._value(rows, positions))
        else:
            self.pieces.setdefault(name, []).append((positions, rows))

    def put_whole(self, name: str, value) -> None:
        """A tap without a token axis (the cache after this forward)."""
        if self.direct:
            self.sink(name, value)
        else:
            self.latest[name] = value

    def finish(self) -> None:
        """Hand on what was kept, in forward order."""
        if not self.pieces and not self.latest:
            return
        last = self.positions[-1] + 1
        for spec in step_taps(self.cfg, 1, len(self.positions), last):
            if spec.name in self.latest:
                self.sink(spec.name, self.latest.pop(spec.name))
            elif spec.name in self.pieces:
                parts = self.pieces.pop(spec.name)
                positions = [p for ps, _ in parts for p in ps]
                self.sink(spec.name, self._value(torch.cat([r for _, r in parts]), positions))

    def _value(self, rows: torch.Tensor, positions: list[int]):
        if positions == self.positions:
            return rows[None]
        return QueryRows(rows[None], positions)


class Recorder:
    """Hooks on a loaded vLLM Qwen3(-MoE) model; taps go to the active StepCapture for the sequence `req_id`."""

    def __init__(self, model: torch.nn.Module, runner, cfg: Qwen3Config):
        self.model, self.runner, self.cfg = model, runner, cfg
        self.req_id: str | None = None
        self.step: StepCapture | None = None
        self._rows: slice | None = None  # the sequence's rows in this forward's flat axis
        self._index = -1  # its index among the forward's sequences
        self._positions: list[int] = []
        self._blocks: torch.Tensor | None = None
        self._seq_len = 0
        self._thread = -1
        self._reducing: tuple | None = None  # (op, layer) of the row-parallel layer running; None: none hooked
        self.handles: list = []
        self._install()

    # -- which rows are ours --------------------------------------------------------------------------

    def _on_forward(self, module, args, kwargs) -> None:
        from vllm.forward_context import get_forward_context

        self._rows = None
        if self.step is None or self.req_id not in self.runner.input_batch.req_ids:
            return
        i = self.runner.input_batch.req_ids.index(self.req_id)
        metadata = get_forward_context().attn_metadata
        md = next(iter(metadata.values())) if isinstance(metadata, dict) else metadata
        start, end = int(md.query_start_loc[i]), int(md.query_start_loc[i + 1])
        if start == end:
            return
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        self._index, self._rows, self._thread = i, slice(start, end), threading.get_ident()
        self._positions = positions[start:end].tolist()
        self._blocks, self._seq_len = md.block_table[i].clone(), int(md.seq_lens[i])
        self.step.begin_forward(self._positions)

    def _wants(self, op: str, layer: int | None) -> bool:
        """Our rows are in the running forward: a step of ours runs, in this thread (another engine of the
        process, e.g. the other side of a diff, runs its forwards in its own)."""
        return (
            self._rows is not None
            and self.step is not None
            and threading.get_ident() == self._thread
            and self.step.sink.wants(tap_name(op, layer))
        )

    def _put(self, op: str, layer: int | None, flat: torch.Tensor) -> None:
        """Our rows of a flat [N, ...] tensor, reshaped to the op's per-token shape."""
        if not self._wants(op, layer):
            return
        rows = flat[self._rows]
        shape = OPS_BY_NAME[op].axes
        c = self.cfg
        if shape[-1] == "D":
            rows = rows.reshape(rows.shape[0], -1, c.head_dim)
        self.step.put_rows(tap_name(op, layer), _copy(rows), self._positions)

    # -- the hooks ------------------------------------------------------------------------------------

    def _install(self) -> None:
        m, c = self.model, self.cfg
        hook = self.handles.append
        hook(m.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        hook(m.model.embed_tokens.register_forward_hook(lambda mod, a, out: self._put("embed", None, out)))
        for i, layer in enumerate(m.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            hook(layer.input_layernorm.register_forward_hook(self._input_norm(i)))
            hook(attn.qkv_proj.register_forward_hook(self._qkv(i, attn.q_size, attn.kv_size)))
            hook(attn.q_norm.register_forward_hook(self._out("q_norm", i)))
            hook(attn.k_norm.register_forward_hook(self._out("k_norm", i)))
            hook(attn.attn.register_forward_pre_hook(self._rope(i)))
            hook(attn.attn.register_forward_hook(self._attention(i)))
            if _reduces(attn.o_proj):
                self._partial(attn.o_proj, "o_proj", i)
            else:
                hook(attn.o_proj.register_forward_hook(self._out("o_proj", i, first=True)))
            hook(layer.post_attention_layernorm.register_forward_hook(self._post_norm(i)))
            if c.is_moe_layer(i):
                hook(mlp.gate.register_forward_hook(self._out("moe.router_logits", i, first=True)))
                self._wrap_router(i, mlp.experts.router)
            else:
                hook(mlp.gate_up_proj.register_forward_hook(self._gate_up(i)))
                hook(mlp.act_fn.register_forward_hook(self._out("mlp.act", i)))
            if not c.is_moe_layer(i) and _reduces(mlp.down_proj):
                self._partial(mlp.down_proj, "mlp.out", i)
            else:
                hook(mlp.register_forward_hook(self._out("mlp.out", i)))
        hook(m.model.norm.register_forward_hook(self._final_norm))
        hook(m.logits_processor.register_forward_hook(self._logits))

    def _partial(self, linear, op: str, layer: int) -> None:
        """A RowParallelLinear that all-reduces: its tap is this rank's partial sum, taken as it enters the
        all-reduce of the tensor-parallel group (which the CPU communicator does in place)."""
        if self._reducing is None:
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()
            original = group.all_reduce

            def all_reduce(input_):
                if self._reducing:
                    self._put(*self._reducing, input_)
                    self._reducing = ()
                return original(input_)

            group.all_reduce = all_reduce
            self.handles.append(_Unwrap(group, "all_reduce"))
            self._reducing = ()

        def enter(mod, args):
            self._reducing = (op, layer)

        def leave(mod, args, out):
            self._reducing = ()

        self.handles.append(linear.register_forward_pre_hook(enter))
        self.handles.append(linear.register_forward_hook(leave))

    def _out(self, op: str, layer: int, first: bool = False):
        def on(mod, args, out):
            self._put(op, layer, out[0] if first else out)

        return on

    def _input_norm(self, layer: int):
        """Layer 0's input norm returns the normed embedding; a later one (normed, previous resid_out)."""

        def on(mod, args, out):
            if isinstance(out, tuple):
                self._put("attn_norm", layer, out[0])
                self._put("resid_out", layer - 1, out[1])
            else:
                self._put("attn_norm", layer, out)

        return on

    def _qkv(self, layer: int, q_size: int, kv_size: int):
        def on(mod, args, out):
            q, k, v = out[0].split([q_size, kv_size, kv_size], dim=-1)
            self._put("q_proj", layer, q)
            self._put("k_proj", layer, k)
            self._put("v_proj", layer, v)

        return on

    def _rope(self, layer: int):
        """The attention's query and key inputs: what `rotary_emb` left in place."""

        def on(mod, args):
            self._put("q_rope", layer, args[0])
            self._put("k_rope", layer, args[1])

        return on

    def _attention(self, layer: int):
        def on(mod, args, out):
            self._put("attn_out", layer, out)
            for op, value in (("k_cache", False), ("v_cache", True)):
                if self._wants(op, layer):
                    self.step.put_whole(tap_name(op, layer), self._cache(mod, value))

        return on

    def _post_norm(self, layer: int):
        def on(mod, args, out):
            self._put("resid_mid", layer, out[1])
            self._put("mlp_norm", layer, out[0])

        return on

    def _gate_up(self, layer: int):
        def on(mod, args, out):
            gate, up = out[0].chunk(2, dim=-1)
            self._put("mlp.gate", layer, gate)
            self._put("mlp.up", layer, up)

        return on

    def _final_norm(self, mod, args, out) -> None:
        self._put("resid_out", self.cfg.num_hidden_layers - 1, out[1])
        self._put("final_norm", None, out[0])

    def _logits(self, mod, args, out) -> None:
        """One row per sequence of the forward, in batch order: ours is at the position of its last token."""
        if self._rows is None or self.step is None or threading.get_ident() != self._thread:
            return
        row = _copy(out[self._index : self._index + 1])
        self.step.last_logits = row[None]
        if self._wants("logits", None):
            self.step.put_rows("logits", row, self._positions[-1:])

    def _wrap_router(self, layer: int, router) -> None:
        original = router.select_experts

        def select_experts(*args, **kwargs):
            weights, ids = original(*args, **kwargs)
            if self._wants("moe.topk_ids", layer) or self._wants("moe.topk_weights", layer):
                order = weights.argsort(dim=-1, descending=True, stable=True)
                self._put("moe.topk_ids", layer, ids.gather(-1, order))
                self._put("moe.topk_weights", layer, weights.gather(-1, order))
            return weights, ids

        router.select_experts = select_experts
        self.handles.append(_Unwrap(router, "select_experts"))

    # -- the paged cache ------------------------------------------------------------------------------

    def _cache(self, attn, value: bool):
        """The sequence's keys or values as the cache holds them after this forward, [1,nKV,S,D]; at a decode
        step past FULL_CACHE_BYTES only the slot it wrote, read alone (as a tap store would keep it). A block
        of the CPU cache ([blocks, nKV, block_size, 2D]) holds its keys transposed, [D, block_size] ("vec"
        layout), then its values, [block_size, D]."""
        cache = attn.kv_cache
        cache = cache[0] if isinstance(cache, (list, tuple)) else cache
        blocks, heads, block_size, _ = cache.shape
        halves = cache.view(blocks, heads, 2 * block_size, -1)
        D, S = halves.shape[-1], self._seq_len
        size = heads * S * D * (4 if cache.dtype == torch.uint8 else cache.element_size())  # as _dequantize gives
        if len(self._positions) == 1 and size > FULL_CACHE_BYTES:
            p = self._positions[0]
            block, at = halves[int(self._blocks[p // block_size])], p % block_size
            slot = block[:, block_size + at] if value else block[:, :block_size].reshape(heads, D, block_size)[..., at]
            return CacheSlots(_copy(_dequantize(slot[None, :, None], attn, value)), [p])
        used = halves[self._blocks[: math.ceil(S / block_size)].long()]
        if value:
            part = used[:, :, block_size:]
        else:
            part = used[:, :, :block_size].reshape(-1, heads, D, block_size).transpose(-1, -2)
        return _copy(_dequantize(part.transpose(0, 1).reshape(heads, -1, D)[:, :S], attn, value)[None])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _dequantize(kv: torch.Tensor, attn, value: bool) -> torch.Tensor:
    """An fp8 cache (stored as uint8) as the float values it holds, times its scale."""
    if kv.dtype != torch.uint8:
        return kv
    fp8 = torch.float8_e5m2 if attn.kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    scale = attn._v_scale_float if value else attn._k_scale_float
    return kv.contiguous().view(fp8).float() * scale


def _reduces(linear) -> bool:
    """A RowParallelLinear whose output is the all-reduce of its ranks' partial sums."""
    return getattr(linear, "reduce_results", False) and getattr(linear, "tp_size", 1) > 1


class _Unwrap:
    """A removable handle for a method wrapped on one object: removing it restores its class's."""

    def __init__(self, obj, attr: str):
        self.obj, self.attr = obj, attr

    def remove(self) -> None:
        self.obj.__dict__.pop(self.attr, None)
