"""`mine` as a Candidate: our own Qwen3 engine (CUDA kernels, or their CPU twin) that emits every tap."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import open_model
from qwen3dbg.run.candidate import Candidate, NullSink, emit, option_flag
from qwen3dbg.tapstore.schema import forward_index, tap_name
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.dtypes import parse_dtype
from qwen3dbg.util.errors import UserError

from .numerics import MineNumerics

DEVICES = ("auto", "cpu", "cuda", "emulated")


def resolve_device(device: str) -> torch.device:
    """'auto' is the GPU where torch and the build have CUDA, else the CPU twin. 'emulated' runs the
    CUDA kernels themselves on the CPU (slow: for checking them against the twin without a GPU)."""
    from .build import cuda_available

    if device not in DEVICES:
        raise UserError(f"mine option device={device!r}: choose auto, cpu, cuda or emulated")
    if device == "cuda" and not cuda_available():
        raise UserError(
            "mine on device cuda, but this torch has no CUDA device (or nvcc is missing): run the "
            "CPU twin (--cand mine:device=cpu, selftest --device cpu) or the kernels emulated "
            "(--device emulated)"
        )
    return torch.device("cuda" if device == "cuda" or (device == "auto" and cuda_available()) else "cpu")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [(nH + 2 nKV) D, H]: q_proj, k_proj, v_proj stacked (one product, same rows)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor  # dense [2I, H]; MoE [E, 2I, H]
    down: torch.Tensor  # dense [H, I]; MoE [E, H, I]
    router: torch.Tensor | None = None  # MoE [E, H]


def load_weights(ckpt: Checkpoint, cfg: Qwen3Config, dtype: torch.dtype, device: torch.device):
    """(embedding, per-layer weights, final norm, lm_head) in the compute dtype on `device`. Only the
    tensors the config declares are read, so stray ones on disk (e.g. biases) are ignored."""

    def get(name):
        return ckpt.get(name, dtype).to(device).contiguous()

    def cat(*names, dim=0):
        return torch.cat([get(n) for n in names], dim).contiguous()

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        common = dict(
            input_norm=get(p + "input_layernorm.weight"),
            post_norm=get(p + "post_attention_layernorm.weight"),
            qkv=cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            q_norm=get(a + "q_norm.weight"),
            k_norm=get(a + "k_norm.weight"),
            o=get(a + "o_proj.weight"),
        )
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            e = [f"{m}experts.{j}." for j in range(cfg.num_experts)]
            layers.append(
                LayerWeights(
                    **common,
                    router=get(m + "gate.weight"),
                    gate_up=torch.stack([cat(x + "gate_proj.weight", x + "up_proj.weight") for x in e]),
                    down=torch.stack([get(x + "down_proj.weight") for x in e]),
                )
            )
        else:
            layers.append(
                LayerWeights(
                    **common,
                    gate_up=cat(m + "gate_proj.weight", m + "up_proj.weight"),
                    down=get(m + "down_proj.weight"),
                )
            )
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    return embed, layers, get("model.norm.weight"), lm_head


@dataclass(frozen=True)
class MineOptions:
    """`--cand mine:key=value` (values arrive as strings), checked when made: device, rmsnorm, scores, accum
    (see numerics.py), max_seq (cache slots), graph (false: no CUDA graph for decode), pdl (false: no
    programmatic dependent launch, so a kernel starts only once the one before has ended; only sm_90 and
    later GPUs overlap them)."""

    device: str = "auto"
    rmsnorm: str = "hf"
    scores: str = "compute"
    accum: str = "fp32"
    max_seq: int | str = 4096
    graph: bool | str = True
    pdl: bool | str = True

    def __post_init__(self):
        self.numerics  # refuses a switch outside its choices
        resolve_device(self.device)
        if not str(self.max_seq).isdigit() or int(self.max_seq) < 1:
            raise UserError(
                f"mine option max_seq={self.max_seq!r}: give the number of cache slots, a whole number >= 1"
            )
        option_flag("mine", "graph", self.graph)
        option_flag("mine", "pdl", self.pdl)

    @property
    def numerics(self) -> MineNumerics:
        return MineNumerics(rmsnorm=self.rmsnorm, scores=self.scores, accum=self.accum)


# The layer loop is here, in Python, and every op is one call into the compiled extension; each op's output
# tensor is handed to the sink as it is, so capture off costs nothing but a `wants` check. On a GPU, decode
# steps without capture replay a CUDA graph of the whole step. Shapes: N = B*T rows.
class MineCandidate(Candidate):
    name = "mine"
    options = MineOptions  # the registry takes its fields as mine's options

    def __init__(self, model_dir, dtype="bfloat16", **options):
        from .build import load

        model = open_model(model_dir, check_layout=False)
        self.config = cfg = model.config
        opts = MineOptions(**options)  # values only: the registry ran `check` before
        self.dtype = parse_dtype(dtype)
        self.numerics = opts.numerics
        self.device = resolve_device(opts.device)
        self.emulated = opts.device == "emulated"
        self.max_seq = min(int(opts.max_seq), cfg.max_position_embeddings)
        self.use_graph = option_flag("mine", "graph", opts.graph) and self.device.type == "cuda"
        self.ops = load(emulated=self.emulated)
        self.use_pdl = (
            option_flag("mine", "pdl", opts.pdl) and self.device.type == "cuda" and self.ops.can_overlap_launches()
        )
        self.embed_w, self.layers, self.final_norm_w, self.lm_head = load_weights(
            model.checkpoint, cfg, self.dtype, self.device
        )
        cos = torch.empty(self.max_seq, cfg.head_dim, dtype=self.dtype)
        sin = torch.empty_like(cos)
        self.ops.rope_table(cos, sin, cfg.rope_theta)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self.none = torch.empty(0, dtype=self.dtype, device=self.device)
        self.tap_names = list(forward_index(cfg))
        self.k_cache = self.v_cache = None
        self.graphs: dict[int, tuple] = {}
        self.reset()

    @staticmethod
    def check(model_dir, dtype="bfloat16", **options) -> MineOptions:
        """All but building the engine and loading the weights (`qwen3dbg.run.registry.check_candidate`)."""
        if parse_dtype(dtype) == torch.float64:
            raise UserError(
                "mine computes in float32, bfloat16 or float16; float64 is the scratch golden's (--impl scratch)"
            )
        if open_model(model_dir, check_layout=False).config.attention_bias:
            raise UserError("mine implements Qwen3 without attention biases, but this config sets attention_bias")
        return MineOptions(**options)

    def manifest_extra(self) -> dict:
        if self.device.type == "cuda":
            where = torch.cuda.get_device_name(self.device)
            ran = f"ran the CUDA kernels on {where}"
        elif self.emulated:
            where, ran = "CUDA kernels emulated on the CPU", "ran the CUDA kernels on the CPU through cuda_emu.h"
        else:
            where, ran = "CPU twin", "ran the CPU twin (no CUDA device used)"
        return {
            "device": "emulated" if self.emulated else self.device.type,
            "device_name": where,
            "numerics": self.numerics.to_dict(),
            "decode_cuda_graph": self.use_graph,
            "programmatic_dependent_launch": self.use_pdl,
            "notes": [ran],
        }

    def reset(self) -> None:
        self.length = 0

    def decode_bytes(self) -> int:
        """Weight bytes one decode token reads: everything but the embedding table (one row of it), with
        the lm_head (tied or not); a MoE layer counted with all its experts, an upper bound."""
        tensors = [t for L in self.layers for t in vars(L).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors + [self.final_norm_w, self.lm_head])

    def _cache(self, batch: int):
        """[L, B, nKV, max_seq, D] per K and V, allocated once per batch size (slot = position)."""
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, self.max_seq, c.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v_cache = torch.empty_like(self.k_cache)
            self.graphs.clear()
        return self.k_cache, self.v_cache

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink = NullSink()) -> torch.Tensor:
        B, T = ids.shape
        S = self.length + T
        if positions.tolist() != [list(range(self.length, S))] * B:
            raise UserError(
                f"mine keeps a token's keys in the cache slot of its position: this step needs positions "
                f"{self.length}..{S - 1} in every row"
            )
        if S > self.config.max_position_embeddings:
            raise UserError(
                f"{S} positions exceed the model's max_position_embeddings "
                f"({self.config.max_position_embeddings}): use fewer tokens"
            )
        if S > self.max_seq:
            raise UserError(f"{S} positions exceed mine's cache of {self.max_seq}: pass the option max_seq={S}")
        self._cache(B)
        ids = ids.to(torch.int64).reshape(-1).contiguous()  # as the kernels read them
        pos = positions.to(torch.int32).reshape(-1).contiguous()
        # A decode step replays the graph unless a tap is wanted (asked only then, and not of a NullSink:
        # ~24 names a layer cost ~30 us a step).
        capture = not isinstance(sink, NullSink) and any(sink.wants(n) for n in self.tap_names)
        if self.use_graph and T == 1 and not capture:
            logits = self._graph_step(ids, pos, B)
        else:
            logits = self.forward(ids.to(self.device), pos.to(self.device), B, T, sink, scores_ld=S, scores_fill=S)
        self.length = S
        return logits

    def _graph_step(self, ids: torch.Tensor, pos: torch.Tensor, batch: int) -> torch.Tensor:
        """One decode step as a replay of a CUDA graph captured once per batch size. Every kernel reads
        positions from device memory, so one graph serves every position."""
        if batch not in self.graphs:
            static_ids, static_pos = ids.to(self.device, copy=True), pos.to(self.device, copy=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(static_ids, static_pos, batch, 1, NullSink(), scores_ld=self.max_seq, scores_fill=0)
            self.graphs[batch] = (graph, static_ids, static_pos, out)
        graph, static_ids, static_pos, out = self.graphs[batch]
        static_ids.copy_(ids)  # from the host straight into the graph's inputs
        static_pos.copy_(pos)
        graph.replay()
        return out.clone()

    def _launch_mode(self) -> None:
        """Overlapping launches are a setting of the whole process, which another engine may have changed."""
        if self.device.type == "cuda":
            self.ops.overlap_launches(self.use_pdl)

    def _new(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def _tap_buffer(self, sink: TapSink, layer: int | None, op: str, *shape) -> torch.Tensor:
        """A buffer for a tap that a fused op writes only when asked (empty: not wanted, not written)."""
        return self._new(*shape) if sink.wants(tap_name(op, layer)) else self.none

    def _emit_buffer(self, sink: TapSink, layer: int | None, op: str, t: torch.Tensor, *shape) -> None:
        if t.numel():
            sink(tap_name(op, layer), t.view(*shape))

    def forward(self, ids, pos, B: int, T: int, sink: TapSink, *, scores_ld: int, scores_fill: int) -> torch.Tensor:
        """One step on ids [B,T] at positions pos [B*T] (device tensors); returns logits [B,T,V]."""
        c, ops, num = self.config, self.ops, self.numerics
        self._launch_mode()
        N, H = B * T, c.hidden_size
        x = self._new(N, H)
        ops.embed(ids.reshape(-1), self.embed_w, x)
        emit(sink, None, "embed", x.view(B, T, -1))
        for i in range(len(self.layers)):
            x = self._layer(i, x, pos, B, T, sink, scores_ld, scores_fill)
        h, logits = self._tap_buffer(sink, None, "final_norm", N, H), self._new(N, c.vocab_size)
        ops.norm_linear(x, self.final_norm_w, self.lm_head, logits, h, c.rms_norm_eps, num.rmsnorm_code, num.accum_code)
        self._emit_buffer(sink, None, "final_norm", h, B, T, H)
        emit(sink, None, "logits", logits.view(B, T, -1))
        return logits.view(B, T, -1)

    def _layer(self, i, x, pos, B, T, sink, scores_ld, scores_fill):
        """Decoder layer i on the residual x [N,H]; returns the residual out. Each RMSNorm happens inside
        the product that reads it, each residual add inside the product before it (norm_linear,
        linear's epilogue), and q/k norm + RoPE inside attention, so a decode step runs five kernels a
        dense layer."""
        c, ops, num, new, L = self.config, self.ops, self.numerics, self._new, self.layers[i]
        N, H, D, nH, nKV = B * T, c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        S, eps = scores_fill, c.rms_norm_eps
        k_cache, v_cache = self.k_cache, self.v_cache
        h, qkv = self._tap_buffer(sink, i, "attn_norm", N, H), new(N, (nH + 2 * nKV) * D)
        ops.norm_linear(x, L.input_norm, L.qkv, qkv, h, eps, num.rmsnorm_code, num.accum_code)
        self._emit_buffer(sink, i, "attn_norm", h, B, T, H)
        emit(sink, i, "q_proj", qkv[:, : nH * D].view(B, T, -1))
        emit(sink, i, "k_proj", qkv[:, nH * D : (nH + nKV) * D].view(B, T, -1))
        emit(sink, i, "v_proj", qkv[:, (nH + nKV) * D :].view(B, T, -1))
        q_norm, k_norm, q_rope, k_rope = new(N, nH, D), new(N, nKV, D), new(N, nH, D), new(N, nKV, D)
        scores, probs, attn = new(B, nH, T, scores_ld, dtype=torch.float32), new(B, nH, T, scores_ld), new(N, nH * D)
        ops.attention(
            qkv,
            L.q_norm,
            L.k_norm,
            self.cos,
            self.sin,
            pos,
            q_norm,
            k_norm,
            q_rope,
            k_rope,
            k_cache,
            v_cache,
            scores,
            probs,
            attn,
            B,
            i,
            scores_fill,
            D**-0.5,
            num.round_scores,
            num.accum_code,
            eps,
            num.rmsnorm_code,
        )
        emit(sink, i, "q_norm", q_norm.view(B, T, nH, D))
        emit(sink, i, "k_norm", k_norm.view(B, T, nKV, D))
        emit(sink, i, "q_rope", q_rope.view(B, T, nH, D))
        emit(sink, i, "k_rope", k_rope.view(B, T, nKV, D))
        emit(sink, i, "k_cache", k_cache[i, :, :, :S])
        emit(sink, i, "v_cache", v_cache[i, :, :, :S])
        if sink.wants(tap_name("attn_scores", i)):  # in the compute dtype like every tap (scores=fp32: rounded)
            sink(tap_name("attn_scores", i), scores[..., :S].to(self.dtype))
        emit(sink, i, "attn_probs", probs[..., :S])
        emit(sink, i, "attn_out", attn.view(B, T, -1))
        o, mid = new(N, H), new(N, H)
        ops.linear(attn, L.o, o, num.accum_code, x, mid)
        emit(sink, i, "o_proj", o.view(B, T, H))
        emit(sink, i, "resid_mid", mid.view(B, T, H))
        out = new(N, H)
        mlp = self._moe(i, L, mid, out, B, T, sink) if L.router is not None else self._dense(i, L, mid, out, B, T, sink)
        emit(sink, i, "mlp.out", mlp.view(B, T, H))
        emit(sink, i, "resid_out", out.view(B, T, H))
        return out

    supports_layer = True

    @torch.no_grad()
    def run_layer(self, layer, hidden, positions, past_kv, sink):
        """Layer `layer` alone on hidden [B,T,H] after a cache past_kv ([B,nKV,S',D] each, or None) for
        teacher forcing; the engine's own cache is as it was afterwards."""
        B, T, H = hidden.shape
        past = 0 if past_kv is None else past_kv[0].shape[2]
        if positions.tolist() != [list(range(past, past + T))] * B:
            raise UserError(f"mine runs a layer at positions {past}..{past + T - 1}, the slots after its cache")
        k_cache, v_cache = self._cache(B)
        saved = k_cache[layer, :, :, : past + T].clone(), v_cache[layer, :, :, : past + T].clone()
        if past:
            k_cache[layer, :, :, :past] = past_kv[0].to(self.device, self.dtype)
            v_cache[layer, :, :, :past] = past_kv[1].to(self.device, self.dtype)
        x = hidden.to(self.device, self.dtype).reshape(B * T, H).contiguous()
        pos = positions.to(self.device, torch.int32).reshape(-1).contiguous()
        self._launch_mode()
        try:
            out = self._layer(layer, x, pos, B, T, sink, past + T, past + T)
        finally:
            k_cache[layer, :, :, : past + T], v_cache[layer, :, :, : past + T] = saved
        return out.view(B, T, H)

    def _dense(self, i, L: LayerWeights, mid, out, B, T, sink) -> torch.Tensor:
        """SwiGLU MLP on RMSNorm(mid); returns its output and writes out = mid + it."""
        num, N, H, inter = self.numerics, B * T, self.config.hidden_size, L.down.shape[1]
        h, gate_up = self._tap_buffer(sink, i, "mlp_norm", N, H), self._new(N, 2 * inter)
        self.ops.norm_linear(
            mid, L.post_norm, L.gate_up, gate_up, h, self.config.rms_norm_eps, num.rmsnorm_code, num.accum_code
        )
        self._emit_buffer(sink, i, "mlp_norm", h, B, T, H)
        emit(sink, i, "mlp.gate", gate_up[:, :inter].view(B, T, inter))
        emit(sink, i, "mlp.up", gate_up[:, inter:].view(B, T, inter))
        act, mlp = self._tap_buffer(sink, i, "mlp.act", N, inter), self._new(N, H)
        self.ops.silu_linear(gate_up, L.down, mlp, act, num.accum_code, mid, out)
        self._emit_buffer(sink, i, "mlp.act", act, B, T, inter)
        return mlp

    def _moe(self, i, L: LayerWeights, mid, out, B, T, sink) -> torch.Tensor:
        """Route each token of RMSNorm(mid) to k experts; every (token, slot) row runs its expert's SwiGLU,
        then each token mixes its k outputs in ascending expert id, and out = mid + the mix. No host
        sync: graph-safe."""
        c, ops, num = self.config, self.ops, self.numerics
        N, k, inter, new, acc = B * T, c.num_experts_per_tok, L.down.shape[2], self._new, num.accum_code
        h, logits = new(N, c.hidden_size), new(N, c.num_experts)  # the experts read h: always written
        ops.norm_linear(mid, L.post_norm, L.router, logits, h, c.rms_norm_eps, num.rmsnorm_code, acc)
        emit(sink, i, "mlp_norm", h.view(B, T, -1))
        ids, weights = new(N, k, dtype=torch.int64), new(N, k)
        ops.route(logits, ids, weights, c.norm_topk_prob)
        emit(sink, i, "moe.router_logits", logits.view(B, T, -1))
        emit(sink, i, "moe.topk_ids", ids.view(B, T, k))
        emit(sink, i, "moe.topk_weights", weights.view(B, T, k))
        gate_up, act, y = new(N * k, 2 * inter), new(N * k, inter), new(N * k, c.hidden_size)
        ops.moe_linear(h, ids, L.gate_up, gate_up, False, acc)
        ops.silu_mul(gate_up, act)
        ops.moe_linear(act, ids, L.down, y, True, acc)
        mlp = torch.empty_like(h)
        ops.moe_combine(y, ids, weights, mlp, mid, out)
        return mlp
