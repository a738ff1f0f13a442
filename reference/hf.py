"""The Hugging Face transformers reference (`--impl hf`): the real model, its real KV cache and masks."""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch
import torch.nn.functional as F

from qwen3dbg.model.model_dir import open_model
from qwen3dbg.run.candidate import Candidate, emit
from qwen3dbg.tapstore.schema import tap_name
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.dtypes import parse_dtype
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.patching import patched
from qwen3dbg.util.third_party import quiet_transformers

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
#: the transformers versions this capture is tested with (pyproject.toml declares the same range)
SUPPORTED_TRANSFORMERS = ">=5.0,<5.25"


def check_transformers_version(version: str) -> None:
    """Refuse a transformers outside the tested range: its modeling code may hold taps elsewhere."""
    from packaging.specifiers import SpecifierSet

    if version not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        raise UserError(
            f"transformers {version} is outside the versions the hf capture is tested with "
            f"({SUPPORTED_TRANSFORMERS}): pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


def router_outputs(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids, topk_weights) among a Qwen3-MoE router's outputs, told apart by dtype: the one integer
    and the one floating [N, k] tensor (the first output is the logits or, before 5.6, their softmax)."""
    found = [t for t in output if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == top_k]
    ids = [t for t in found if not t.is_floating_point()]
    weights = [t for t in found if t.is_floating_point()]
    if len(ids) != 1 or len(weights) != 1:
        import transformers

        raise UserError(
            f"transformers {transformers.__version__}: the Qwen3-MoE router returns no single top-k "
            f"id and weight tensor: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )
    return ids[0], weights[0]


# Taps that are module outputs come from forward hooks; the rest (RoPE output, attention scores and
# probabilities) from narrow wrappers around transformers' module-level functions, installed for one step and
# restored on exit; cache contents are read from the model's own DynamicCache after the step. Nothing relies on an
# output convention that transformers changed between the versions we accept: the router logits are recomputed
# from the router's own input and weight (before 5.6 its first output is the softmax), and its top-k ids and
# weights are told apart by dtype, not by position.
class HFCandidate(Candidate):
    name = "hf"
    fresh_taps = True  # module outputs are new tensors; DynamicCache grows by concatenation

    def __init__(self, model_dir, dtype="float32", *, attn: str = "eager"):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        model = open_model(model_dir, check_layout=False)
        self.config = model.config
        self.dtype = parse_dtype(dtype)
        self.attn = attn
        extra = {"experts_implementation": "eager"} if self.config.is_moe else {}
        hf_logging.disable_progress_bar()
        with quiet_transformers():  # its LOAD REPORT of unexpected keys: scan-checkpoint says it plainly
            self.model = AutoModelForCausalLM.from_pretrained(
                model.path, dtype=self.dtype, attn_implementation=attn, **extra
            )
        self.model.eval()
        self.modeling = importlib.import_module(type(self.model).__module__)
        # transformers renamed forward's past_key_values to cache (the old name warns until 5.40)
        forward = inspect.signature(type(self.model).forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        if attn != "eager":  # sdpa computes scores and probabilities inside one fused call
            self.missing_taps = frozenset({"attn_scores", "attn_probs"})
        self.reset()

    @staticmethod
    def check(model_dir, dtype="float32", *, attn: str = "eager") -> None:
        """What can be refused before loading the weights (`qwen3dbg.run.registry.check_candidate`)."""
        import transformers

        check_transformers_version(transformers.__version__)
        if attn not in ATTN_IMPLEMENTATIONS:
            raise UserError(f"--attn {attn!r}: choose eager (scores and probabilities captured) or sdpa")

    def manifest_extra(self) -> dict:
        return {"attn_implementation": self.attn, **({"experts_implementation": "eager"} if self.config.is_moe else {})}

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.no_grad()
    def step(self, ids, positions, sink: TapSink):
        with self._capture(sink), quiet_transformers():  # its FutureWarnings come through torch's module call
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits

    @contextlib.contextmanager
    def _capture(self, sink: TapSink):
        B_T = {}
        current = {"layer": None}
        handles = []
        base = self.model.model

        def out_hook(layer, op):
            def hook(module, args, output):
                emit(sink, layer, op, output)

            return hook

        def in_hook(layer, op):
            def hook(module, args):
                emit(sink, layer, op, args[0])

            return hook

        def enter_layer(i):
            def hook(module, args):
                current["layer"] = i
                B_T["shape"] = args[0].shape[:2]

            return hook

        cache, update = self.cache, self.cache.update

        def cache_update(key_states, value_states, layer_idx, *args, **kwargs):
            # Handed on as the attention stores them, before it computes its scores: in the schema's order,
            # so the comparison never sets the attention matrices aside waiting for the cache.
            out = update(key_states, value_states, layer_idx, *args, **kwargs)
            emit(sink, layer_idx, "k_cache", cache.layers[layer_idx].keys)
            emit(sink, layer_idx, "v_cache", cache.layers[layer_idx].values)
            return out

        def per_token(t):  # the router flattens tokens: [B*T, X] -> [B, T, X]
            return t.reshape(*B_T["shape"], -1)

        def router_hook(layer):
            def hook(module, args, output):
                if sink.wants(tap_name("moe.router_logits", layer)):
                    # What every accepted version's router computes first, before it may softmax in place.
                    x = args[0].reshape(-1, module.weight.shape[1])
                    sink(tap_name("moe.router_logits", layer), per_token(F.linear(x, module.weight)))
                ids, weights = router_outputs(output, self.config.num_experts_per_tok)
                emit(sink, layer, "moe.topk_weights", per_token(weights))
                emit(sink, layer, "moe.topk_ids", per_token(ids))

            return hook

        reg = lambda m, h: handles.append(m.register_forward_hook(h))  # noqa: E731
        pre = lambda m, h: handles.append(m.register_forward_pre_hook(h))  # noqa: E731
        reg(base.embed_tokens, out_hook(None, "embed"))
        for i, layer in enumerate(base.layers):
            att, mlp = layer.self_attn, layer.mlp
            pre(layer, enter_layer(i))
            reg(layer.input_layernorm, out_hook(i, "attn_norm"))
            for op in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj"):
                reg(getattr(att, op), out_hook(i, op))
            pre(att.o_proj, in_hook(i, "attn_out"))
            pre(layer.post_attention_layernorm, in_hook(i, "resid_mid"))
            reg(layer.post_attention_layernorm, out_hook(i, "mlp_norm"))
            if self.config.is_moe_layer(i):
                reg(mlp.gate, router_hook(i))
            else:
                reg(mlp.gate_proj, out_hook(i, "mlp.gate"))
                reg(mlp.up_proj, out_hook(i, "mlp.up"))
                pre(mlp.down_proj, in_hook(i, "mlp.act"))
            reg(mlp, out_hook(i, "mlp.out"))
            reg(layer, out_hook(i, "resid_out"))
        reg(base.norm, out_hook(None, "final_norm"))
        reg(self.model.lm_head, out_hook(None, "logits"))

        m = self.modeling

        def rope(original):
            def wrapper(q, k, cos, sin, *args, **kwargs):
                q, k = original(q, k, cos, sin, *args, **kwargs)
                emit(sink, current["layer"], "q_rope", q.transpose(1, 2))
                emit(sink, current["layer"], "k_rope", k.transpose(1, 2))
                return q, k

            return wrapper

        grab: dict = {}  # "scores": inside eager attention, the input of its softmax once it is called

        def softmax(original):
            def wrapper(x, *args, **kwargs):
                if "scores" in grab:
                    grab["scores"] = x
                return original(x, *args, **kwargs)

            return wrapper

        def eager(original):
            def wrapper(module, query, key, value, attention_mask, scaling, *args, **kwargs):
                i = current["layer"]
                wants = sink.wants(tap_name("attn_scores", i))
                if wants:
                    grab["scores"] = None
                try:
                    out, probs = original(module, query, key, value, attention_mask, scaling, *args, **kwargs)
                finally:
                    scores = grab.pop("scores", None)
                if wants:
                    # The pre-softmax scores eager does not return: its softmax's input, the scores plus the
                    # mask (computing them again cost a third of its attention); else the same ops again.
                    if scores is None:
                        keys = m.repeat_kv(key, module.num_key_value_groups)
                        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
                        scores = scores if attention_mask is None else scores + attention_mask
                    if attention_mask is not None:
                        scores = scores.masked_fill(scores <= torch.finfo(scores.dtype).min / 2, float("-inf"))
                    sink(tap_name("attn_scores", i), scores)
                emit(sink, i, "attn_probs", probs)
                return out, probs

            return wrapper

        # Patched for this thread only: a diff runs the reference and an hf candidate side by side.
        cache.update = cache_update
        try:
            with (
                patched(m, "apply_rotary_pos_emb", rope),
                patched(m, "eager_attention_forward", eager),
                patched(F, "softmax", softmax),
            ):
                yield
        finally:
            del cache.update
            for h in handles:
                h.remove()
