"""`--cand llamacpp:MODEL.gguf`: a GGUF run by llama.cpp (llama-cpp-python), tapped through its eval callback."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import torch
from qwen3dbg.reference.qwen3 import causal_mask

from qwen3dbg.model.model_dir import open_model
from qwen3dbg.run.candidate import Candidate
from qwen3dbg.tapstore.schema import OPS_BY_NAME, step_taps
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.dtypes import parse_dtype
from qwen3dbg.util.errors import UserError

SCORES_NOTE = (
    "attn_scores is llama.cpp's kq node times 1/sqrt(head_dim) with the causal mask applied by "
    "the adapter (llama.cpp scales and masks inside its fused softmax)"
)

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
NUMPY_TYPES = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32}
FLASH_ATTN_DISABLED = 0


class GGMLTensor(ctypes.Structure):
    """A ctypes mirror of `struct ggml_tensor` (ggml.h) up to `name`: enough to read a node."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


# Schema op -> (llama.cpp node names, `{i}` the layer, in order of preference; which occurrence). A name
# can occur several times in one graph: Qcur-{i} is the projection, then its head reshape, then the RoPE
# output; the cache views come after the step's keys and values were stored.
FIRST, LAST = 0, -1
TAP_NODES: dict[str, tuple[tuple[str, ...], int]] = {
    "embed": (("embd", "inp_embd"), FIRST),
    "attn_norm": (("attn_norm-{i}",), FIRST),
    "q_proj": (("Qcur-{i}",), FIRST),
    "k_proj": (("Kcur-{i}",), FIRST),
    "v_proj": (("Vcur-{i}",), FIRST),
    "q_norm": (("Qcur_normed-{i}",), FIRST),
    "k_norm": (("Kcur_normed-{i}",), FIRST),
    "q_rope": (("Qcur-{i}",), LAST),
    "k_rope": (("Kcur-{i}",), LAST),
    "k_cache": (("cache_k_l{i} (view)",), LAST),
    "v_cache": (("cache_v_l{i} (view)",), LAST),
    "attn_scores": (("kq-{i}",), FIRST),
    "attn_probs": (("kq_soft_max-{i}",), FIRST),
    "attn_out": (("kqv_out-{i}",), FIRST),
    "o_proj": (("o_proj-{i}",), FIRST),  # llama.cpp leaves it unnamed: the matmul reading kqv_out-{i}
    "resid_mid": (("ffn_inp-{i}",), FIRST),
    "mlp_norm": (("ffn_norm-{i}",), FIRST),
    "mlp.gate": (("ffn_gate-{i}",), FIRST),
    "mlp.up": (("ffn_up-{i}",), FIRST),
    "mlp.act": (("ffn_swiglu-{i}",), FIRST),
    "moe.router_logits": (("ffn_moe_logits-{i}",), FIRST),
    "moe.topk_ids": (("ffn_moe_topk-{i}",), FIRST),
    # the weights llama.cpp multiplies with, most processed first: it renormalises by its own rules
    # (always for qwen3moe), which a norm_topk_prob=false model then shows as a divergence
    "moe.topk_weights": (("ffn_moe_weights_scaled-{i}", "ffn_moe_weights_norm-{i}", "ffn_moe_weights-{i}"), FIRST),
    "mlp.out": (("ffn_out-{i}", "ffn_moe_out-{i}"), FIRST),
    "resid_out": (("l_out-{i}",), FIRST),
    "final_norm": (("result_norm",), FIRST),
    "logits": (("result_output",), FIRST),
}
O_PROJ = "o_proj-{i}"


def node_names(op: str, layer: int | None) -> tuple[str, ...]:
    return tuple(n.format(i=layer) for n in TAP_NODES[op][0])


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "llamacpp: candidates need llama-cpp-python: pip install '.[llamacpp]' in the qwen3dbg checkout "
            "(or run .ci/install_llamacpp.sh)"
        ) from None
    return llama_cpp


_QUIET: list = []  # llama.cpp keeps the log callback for the whole process: so must we


def _silence_logs(llama_cpp) -> None:
    if not _QUIET:
        llama_cpp.llama_backend_init()
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
        llama_cpp.llama_log_set(_QUIET[0], ctypes.c_void_p())


def _tensor_get():
    """ggml_backend_tensor_get from the ggml library that llama-cpp-python ships."""
    from llama_cpp import _ggml

    fn = _ggml.libggml.ggml_backend_tensor_get
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    fn.restype = None
    return fn


def read_node(t: GGMLTensor, ptr: int, tensor_get) -> np.ndarray:
    """A node's data in numpy order: shape reversed(ne), honouring its byte strides nb."""
    if t.type not in NUMPY_TYPES:
        raise UserError(f"llamacpp: node {t.name.decode()} has ggml type {t.type}, not f32/f16/i32")
    dtype = np.dtype(NUMPY_TYPES[t.type])
    ne, nb = list(t.ne), list(t.nb)
    extent = dtype.itemsize + sum((n - 1) * s for n, s in zip(ne, nb))
    buf = (ctypes.c_uint8 * extent)()
    tensor_get(ptr, ctypes.addressof(buf), 0, extent)
    assert all(s % dtype.itemsize == 0 for s in nb), "ggml strides of f32/f16/i32 tensors are whole elements"
    return np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=dtype), shape=ne[::-1], strides=nb[::-1]).copy()


def attention_matrix(x: np.ndarray, heads: int, tokens: int, cache_len: int) -> np.ndarray:
    """kq or kq_soft_max, numpy shape [nH, T, n_kv] with n_kv the padded cache -> [1, nH, T, S]."""
    return x.reshape(heads, tokens, -1)[:, :, :cache_len][None]


def _stage(layer: int | None, op: str, layers: int) -> int:
    """Where a tap's nodes are computed: -1 the embedding, 0.. its layer, `layers` the final norm and head."""
    return layer if layer is not None else -1 if op == "embed" else layers


class _Forward:
    """One llama_decode's taps: the nodes of the stage being computed are kept; when the graph reaches the
    next stage, the finished stage's taps are made and handed to the sink and its nodes dropped."""

    def __init__(self, cand: "LlamaCppCandidate", read: list, wanted: dict, positions: torch.Tensor, sink: TapSink):
        self.cand, self.wanted, self.positions, self.sink = cand, wanted, positions, sink
        layers = cand.config.num_hidden_layers
        self.stages: dict[int, list] = {}
        self.stage_of: dict[str, int] = {}
        for spec in read:
            stage = _stage(spec.layer, spec.op, layers)
            self.stages.setdefault(stage, []).append(spec)
            self.stage_of.update((n, stage) for n in node_names(spec.op, spec.layer))
        self.done = -2  # the stages up to this one are handed on
        self.logits: torch.Tensor | None = None

    def reached(self, node: str) -> None:
        """llama.cpp is about to hand over `node`: every stage before its own is complete."""
        stage = self.stage_of[node]
        if stage <= self.done:
            raise UserError(
                f"llamacpp: llama.cpp computed node {node} after the taps of a later stage were handed on; "
                "this llama.cpp version orders its graph differently"
            )
        self._hand_on(stage - 1)

    def finish(self) -> None:
        self._hand_on(max(self.stages))

    def _hand_on(self, upto: int) -> None:
        for stage in sorted(s for s in self.stages if self.done < s <= upto):
            for spec in self.stages[stage]:
                t = self.cand._tap(spec, self.positions)
                if spec.op == "logits":
                    self.logits = t
                if spec.name in self.wanted:
                    self.sink(spec.name, t)
            for spec in self.stages[stage]:  # after all of them: a node may hold two taps (Qcur-{i})
                for n in node_names(spec.op, spec.layer):
                    self.cand._nodes.pop(n, None)
        self.done = max(self.done, upto)


def _check_gguf(gguf_path: str, config) -> None:
    gguf = Path(gguf_path)
    if not gguf.is_file():
        raise UserError(
            f"llamacpp:{gguf_path}: no such GGUF file (write one with `qwen3dbg make-model OUT.gguf "
            "--format gguf` or llama.cpp's converter)"
        )
    from qwen3dbg.model.gguf_io import GGUFDamaged, config_from_gguf, data_region_problems, read_gguf

    try:
        g = read_gguf(gguf)
        theirs = config_from_gguf(g)
    except GGUFDamaged as e:
        raise UserError(f"{gguf} is not a readable GGUF file: {e}") from None
    if problems := data_region_problems(g):
        tensor, problem, _ = problems[0]
        raise UserError(
            f"{gguf}{': ' + tensor if tensor else ''}: {problem}; run `qwen3dbg scan-checkpoint "
            f"{gguf}` for every problem"
        )
    if bad := theirs.shape_mismatches(config):
        f = bad[0]
        raise UserError(
            f"{gguf} has {f} {getattr(theirs, f)} but the model directory has "
            f"{getattr(config, f)}: compare a GGUF against the checkpoint it was made from"
        )


# llama.cpp names its graph nodes (`attn_norm-0`, `Qcur_normed-0`, `kq_soft_max-0`, ...). The callback asks for
# the nodes that hold taps, copies each one out of its backend buffer as it is computed, and `_tap` brings the
# layout to the schema: ggml lists dimensions fastest first (reversed), keeps heads as [D, heads, T], stores V
# transposed, and pads the attention key axis to the KV cache size. A tap with no node in llama.cpp's graph is
# declared in missing_taps, never reconstructed. Which occurrence of a node holds a tap (the last Qcur-{i} is the
# RoPE output) is known only once the graph has moved on, so the nodes of one stage (the embedding, a layer, the
# head) are held until the first node of the next stage is computed; then that stage's taps go to the sink, in
# schema order, while llama.cpp computes the rest: a forward never holds more than one layer's nodes.
class LlamaCppCandidate(Candidate):
    """A GGUF in llama.cpp, batch 1; options: n_ctx (positions, default 1024), threads (default 2)."""

    reads_model_weights = False
    fresh_taps = True  # every tap is a copy read out of ggml's buffers, never written again

    def __init__(self, gguf_path: str, model_dir, dtype="float32", *, n_ctx: int = 1024, threads: int = 2):
        self.gguf = Path(gguf_path)
        self.name = f"llamacpp:{self.gguf.name}"
        self.config = open_model(model_dir, check_layout=False).config
        self.dtype = parse_dtype(dtype)
        self.missing_taps = frozenset(OPS_BY_NAME) - set(TAP_NODES)
        self.llama = _import_llama_cpp()
        self.tensor_get = _tensor_get()
        self._load(n_ctx, threads)

    @staticmethod
    def check(gguf_path: str, model_dir, dtype="float32", *, n_ctx: int = 1024, threads: int = 2) -> None:
        """All but loading the model (`qwen3dbg.run.registry.check_candidate`): the GGUF file's shapes fit the
        model directory, and llama-cpp-python imports."""
        _check_gguf(gguf_path, open_model(model_dir, check_layout=False).config)
        _import_llama_cpp()

    def _load(self, n_ctx: int, threads: int) -> None:
        L = self.llama
        _silence_logs(L)
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(self.gguf).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp could not load {self.gguf} (run with a real llama.cpp to see its log)")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx  # one ubatch per step: every node computed once
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        # for a fair comparison: an f32 KV cache, no flash attention, and logits for every token
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = FLASH_ATTN_DISABLED
        cp.embeddings = False
        # A collected CFUNCTYPE object would leave llama.cpp calling freed memory: keep it on self.
        self._callback = L.ggml_backend_sched_eval_callback(self._on_node)
        cp.cb_eval = self._callback
        cp.cb_eval_user_data = None
        self.n_ctx = n_ctx
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise UserError(f"llama.cpp could not create a context for {self.gguf}")
        self._nodes: dict[str, list[np.ndarray]] = {}
        self._want: set[str] = set()
        self._kqv_out: dict[int, int] = {}  # pointer of kqv_out-{i} -> i
        self._error: BaseException | None = None
        self._forward: _Forward | None = None
        self.cache_len = 0

    def manifest_extra(self) -> dict:
        return {
            "gguf": str(self.gguf),
            "llama_cpp_python": getattr(self.llama, "__version__", "?"),
            "notes": [
                "llama.cpp ran with an f32 KV cache, flash attention off and logits for every token",
                SCORES_NOTE,
            ],
        }

    def reset(self) -> None:
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)
        self.cache_len = 0

    # -- the eval callback: ask=True "do you want this node?", then ask=False with its data --

    def _on_node(self, ptr, ask, _user) -> bool:
        try:
            t = GGMLTensor.from_address(ptr)
            name = t.name.decode(errors="replace")
            o_proj = name not in self._want and t.src[1] in self._kqv_out
            if ask:
                if name.startswith("kqv_out-"):
                    self._kqv_out[ptr] = int(name.rsplit("-", 1)[1])
                return name in self._want or (o_proj and O_PROJ.format(i=self._kqv_out[t.src[1]]) in self._want)
            key = O_PROJ.format(i=self._kqv_out[t.src[1]]) if o_proj else name
            self._forward.reached(key)
            self._nodes.setdefault(key, []).append(read_node(t, ptr, self.tensor_get))
            return True
        except BaseException as e:  # an exception must not cross into C: keep it for step() to raise
            self._error = e
            return False

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink) -> torch.Tensor:
        L, c = self.llama, self.config
        if ids.shape[0] != 1:
            raise UserError("llamacpp: candidates run batch 1 (one sequence): pass a single prompt")
        tokens = ids.shape[1]
        if self.cache_len + tokens > self.n_ctx:
            raise UserError(f"llamacpp: {self.cache_len + tokens} positions exceed the context of {self.n_ctx}")
        specs = step_taps(c, 1, tokens, self.cache_len + tokens)
        wanted = {t.name: t for t in specs if t.op not in self.missing_taps and sink.wants(t.name)}
        read = [t for t in specs if t.name in wanted or t.op == "logits"]
        self._want = {n for t in read for n in node_names(t.op, t.layer)}
        self._nodes, self._kqv_out, self._error = {}, {}, None
        self._forward = forward = _Forward(self, read, wanted, positions, sink)
        batch = L.llama_batch_init(tokens, 0, 1)
        try:
            for j in range(tokens):
                batch.token[j], batch.pos[j] = int(ids[0, j]), int(positions[0, j])
                batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = 1, 0, True
            batch.n_tokens = tokens
            rc = L.llama_decode(self.ctx, batch)
        finally:
            L.llama_batch_free(batch)
        if self._error is not None:
            raise self._error
        if rc != 0:
            raise UserError(f"llama_decode failed with code {rc}")
        self.cache_len += tokens
        forward.finish()
        return forward.logits

    def _tap(self, spec, positions: torch.Tensor) -> torch.Tensor:
        """The schema tensor of one tap from the nodes of the last decode."""
        c, layer, op = self.config, spec.layer, spec.op
        names, pick = node_names(op, layer), TAP_NODES[op][1]
        seen = next((self._nodes[n] for n in names if n in self._nodes), None)
        if not seen:
            raise UserError(
                f"llamacpp: llama.cpp computed no node {' or '.join(names)} for tap {spec.name}; "
                "this llama.cpp version names its graph differently"
            )
        x = seen[pick]
        if op == "k_cache":  # [n_kv, nKV, D], the cache padded to n_kv cells
            x = x.reshape(-1, c.num_key_value_heads, c.head_dim)[: spec.shape[2]].transpose(1, 0, 2)
        elif op == "v_cache":  # stored transposed without flash attention: [D, nKV, n_kv]
            x = x.reshape(c.head_dim, c.num_key_value_heads, -1)[:, :, : spec.shape[2]].transpose(1, 2, 0)
        elif op in ("attn_scores", "attn_probs"):
            x = attention_matrix(x, c.num_attention_heads, spec.shape[2], spec.shape[3])
            if op == "attn_scores":
                x = x * np.float32(1.0 / math.sqrt(c.head_dim))
                x = np.where(causal_mask(positions, spec.shape[3]).numpy(), -np.inf, x)
        t = torch.from_numpy(np.ascontiguousarray(x)).reshape(spec.shape)
        if OPS_BY_NAME[op].integer:
            return t.to(torch.int64)
        return t.to(self.dtype)

    def __del__(self):
        L = getattr(self, "llama", None)
        if L is None:
            return
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None
