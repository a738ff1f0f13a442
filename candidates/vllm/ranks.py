"""`vllm:tp=N`: the recorder in each of vLLM's worker processes, and each tap's layout on a rank read from vLLM's
own parallel layers (docs/engines.md, "Tensor-parallel runs").

The functions taking `worker` first run inside every worker through `collective_rpc` (importable by name: the
workers unpickle them by reference). A worker's taps go to the diff's process through `channel.Sender`.
"""

from __future__ import annotations

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import tap_name
from qwen3dbg.tapstore.store import REPLICATED, Shard

from .channel import Sender
from .forcing import set_forced
from .recorder import Recorder, StepCapture, cache_layout as _cache_layout

#: the worker's recorder and its sender (one model per worker process)
_STATE: dict[str, object] = {}


def layouts(model) -> dict[str, Shard]:
    """This rank's shard of each tap that is not replicated, by tap name, from the layers that compute it:
    - QKVParallelLinear: q_proj/q_norm/q_rope by this rank's q heads (`num_heads` from `tp_rank`), k and v by
      its kv heads (`num_kv_heads` of kv shard `tp_rank // num_kv_head_replicas`: ranks that replicate a kv
      head hold copies of one slice); the paged cache like k and v;
    - RowParallelLinear (o_proj, a dense MLP's down_proj): its input (attn_out, mlp.act) is this rank's
      `input_size_per_partition` slice; when it all-reduces (`reduce_results`, tp_size > 1) its output is
      taken before the all-reduce, a partial sum;
    - MergedColumnParallelLinear (gate_up_proj): gate and up by this rank's columns of each output;
    - every other tap (embeddings and the logits after their all-reduce or all-gather, norms, residuals, the
      MoE router, its expert choice and the MoE block's reduced output) is a whole copy."""
    out: dict[str, Shard] = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o = attn.qkv_proj, attn.o_proj
        if qkv.tp_size > 1:
            D = qkv.head_size
            q0 = qkv.tp_rank * qkv.num_heads
            kv0 = (qkv.tp_rank // qkv.num_kv_head_replicas) * qkv.num_kv_heads
            q, kv = (q0, q0 + qkv.num_heads), (kv0, kv0 + qkv.num_kv_heads)
            for op, axis, (a, b), per in (
                ("q_proj", 2, q, D),
                ("k_proj", 2, kv, D),
                ("v_proj", 2, kv, D),
                ("q_norm", 2, q, 1),
                ("k_norm", 2, kv, 1),
                ("q_rope", 2, q, 1),
                ("k_rope", 2, kv, 1),
                ("k_cache", 1, kv, 1),
                ("v_cache", 1, kv, 1),
            ):
                out[tap_name(op, i)] = Shard("split", axis, a * per, b * per)
        _row(out, o, "attn_out", "o_proj", i)
        if hasattr(mlp, "gate_up_proj"):
            gate_up = mlp.gate_up_proj
            if gate_up.tp_size > 1:
                width = gate_up.output_sizes[0] // gate_up.tp_size
                for op in ("mlp.gate", "mlp.up"):
                    out[tap_name(op, i)] = Shard("split", 2, gate_up.tp_rank * width, (gate_up.tp_rank + 1) * width)
            _row(out, mlp.down_proj, "mlp.act", "mlp.out", i)
    if getattr(model.logits_processor, "use_all_gather", True) is False:
        raise RuntimeError("vLLM gathers the logits to one rank here: --cand vllm:tp=N reads them all-gathered")
    return out


def _row(out: dict[str, Shard], layer, into: str, op: str, i: int) -> None:
    """A RowParallelLinear's input slice (`into`) and its output (`op`): a partial sum when it all-reduces."""
    if layer.tp_size == 1:
        return
    width = layer.input_size_per_partition
    out[tap_name(into, i)] = Shard("split", 2, layer.tp_rank * width, (layer.tp_rank + 1) * width)
    if layer.reduce_results:
        out[tap_name(op, i)] = Shard("partial")


class RankSink:
    """What a worker's StepCapture hands taps to: the wanted ones go to the diff with this rank's shard."""

    def __init__(self, sender: Sender, wanted: set[str], shards: dict[str, Shard]):
        self.sender, self.wanted, self.shards = sender, wanted, shards

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def __call__(self, name: str, value) -> None:
        if name in self.wanted:
            self.sender.tap(name, self.shards.get(name, REPLICATED), value)


def install(worker, address: str, authkey: bytes, cfg: Qwen3Config) -> int:
    """Hook the worker's model and connect to the diff's `channel.Receiver`; returns this worker's rank."""
    runner = worker.model_runner
    _STATE.update(
        recorder=Recorder(runner.model, runner, cfg),
        sender=Sender(address, authkey, worker.rank),
        cfg=cfg,
        shards=layouts(runner.model),
    )
    return worker.rank


def cache_layout(worker) -> str:
    return _cache_layout(worker.model_runner.model)


def watch(worker, req_id: str) -> None:
    """The request whose rows the recorder cuts out of each forward."""
    _STATE["recorder"].req_id = req_id


def begin_step(worker, positions: list[int], wanted: list[str]) -> None:
    sink = RankSink(_STATE["sender"], set(wanted), _STATE["shards"])
    _STATE["recorder"].step = StepCapture(sink, positions, _STATE["cfg"])


def end_step(worker):
    """Hand on what the step kept, end it on the channel; (positions computed, logits at the last one)."""
    recorder = _STATE["recorder"]
    capture, recorder.step = recorder.step, None
    capture.finish()
    _STATE["sender"].end_step()
    return sorted(capture.computed), capture.last_logits


def force(worker, key: str, ids: list[int] | None) -> None:
    """The forced decode ids of request key `key` in this worker's sampler (`forcing.set_forced`)."""
    set_forced(key, ids)
