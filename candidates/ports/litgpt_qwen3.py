"""litgpt's own Qwen3 and Qwen3-MoE (`litgpt.model.GPT`) as a candidate: `--cand litgpt`. Its taps come through
candidates/mappings/litgpt_qwen3.toml; this file builds litgpt's config and loads the weights with its converter."""

from __future__ import annotations

from pathlib import Path

import torch
from qwen3dbg.candidates.module_adapter import ModuleCandidate

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import Qwen3Config, load_config
from qwen3dbg.util.errors import UserError

TAP_MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "litgpt_qwen3.toml"
# litgpt 0.5.13 pins huggingface-hub<1.4, which would drag transformers down, while its model code runs with
# ours: install it without its dependencies, then what that code imports (docs/ports.md).
INSTALL = "pip install --no-deps litgpt==0.5.13 && pip install '.[litgpt]' in the qwen3dbg checkout"
#: the longest sequence the port runs (litgpt's block_size: its rope tables' length, its cache's ceiling)
MAX_SEQ = 8192


def litgpt_config(cfg: Qwen3Config):
    """litgpt's Config for a Qwen3 checkpoint, field by field as litgpt's own Qwen3 entries set them."""
    from litgpt import Config

    if cfg.is_moe and not all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise UserError(
            "litgpt's Qwen3-MoE makes every layer sparse: this checkpoint has dense layers "
            "(mlp_only_layers or decoder_sparse_step), which litgpt cannot express"
        )
    moe = (
        dict(
            mlp_class_name="LLaMAMoE",
            moe_intermediate_size=cfg.moe_intermediate_size,
            n_expert=cfg.num_experts,
            n_expert_per_token=cfg.num_experts_per_tok,
            norm_topk_prob=cfg.norm_topk_prob,
        )
        if cfg.is_moe
        else dict(mlp_class_name="LLaMAMLP")
    )
    return Config(
        name="qwen3dbg",
        block_size=min(cfg.max_position_embeddings, MAX_SEQ),
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size,
        n_layer=cfg.num_hidden_layers,
        n_embd=cfg.hidden_size,
        n_head=cfg.num_attention_heads,
        n_query_groups=cfg.num_key_value_heads,
        head_size=cfg.head_dim,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=cfg.rms_norm_eps,
        rope_base=cfg.rope_theta,
        norm_qk=True,
        intermediate_size=cfg.intermediate_size,
        **moe,
    )


def load(model_dir, dtype=torch.float32):
    """The factory: litgpt's GPT with the checkpoint's weights and a KV cache for one sequence.

    Built as litgpt's own scripts do it (on the meta device, then the weights assigned): the weights stay
    memory-mapped from the checkpoint where its dtype is the run's, a tied lm_head is the embedding itself, not
    a copy, and the cache grows with the positions filled instead of holding MAX_SEQ slots from the start."""
    try:
        from litgpt.model import GPT
        from litgpt.scripts.convert_hf_checkpoint import copy_weights_qwen_3
    except ImportError as e:
        raise UserError(f"litgpt's model code cannot be imported ({e}): {INSTALL}") from None

    config = litgpt_config(load_config(model_dir))
    checkpoint = Checkpoint(model_dir)
    state: dict[str, torch.Tensor] = {}
    # litgpt's converter reads a tensor through its `_load_tensor` when it places it: one at a time, as litgpt's
    # own lazy loader hands them over, converted to the run's dtype there
    lazy = {name: _Lazy(checkpoint, name) for name in checkpoint.keys()}
    copy_weights_qwen_3(config, {}, state, lazy, dtype=dtype)  # a tied lm_head: the embedding's own tensor
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    # the rope tables were built on the meta device: again, in the dtype litgpt runs a bf16 model in
    model.cos, model.sin = (t.to(dtype) for t in model.rope_cache(device=torch.device("cpu")))
    model.eval()
    model.set_kv_cache(batch_size=1, max_seq_length=CACHE_CHUNK, dtype=dtype)
    forward = model.forward

    def filled(idx: torch.Tensor, input_pos: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # As litgpt's own generate calls it: attention over the positions filled so far, not the whole cache
        # behind a mask (at a 2048-token prompt over MAX_SEQ slots that was 4x the scores' memory and work).
        if input_pos is not None:
            kwargs.setdefault("input_pos_maxp1", int(input_pos.max()) + 1)
            _fit_cache(model, kwargs["input_pos_maxp1"])
        return forward(idx, input_pos, **kwargs)

    model.forward = filled
    return model


class _Lazy:
    """A checkpoint tensor read when litgpt's converter asks for it (its `load_param` calls `_load_tensor`)."""

    def __init__(self, checkpoint: Checkpoint, name: str):
        self.checkpoint, self.name = checkpoint, name

    def _load_tensor(self) -> torch.Tensor:
        return self.checkpoint.get(self.name)


#: the cache grows by whole chunks of positions: a 2048-token prompt and its decode steps grow it once per 256
CACHE_CHUNK = 256


def _fit_cache(model, positions: int) -> None:
    """Give every layer's cache at least `positions` slots (and litgpt's mask as many), keeping what the slots
    filled so far hold. The cache modules stay (the mapping's hooks are on them): their buffers are replaced,
    a layer's old one dropped as soon as the new one holds it."""
    from litgpt.model import build_mask_cache

    have = model.mask_cache.size(-1)
    if positions <= have:
        return
    size = min(-(-positions // CACHE_CHUNK) * CACHE_CHUNK, model.max_seq_length)
    for block in model.transformer.h:
        cache = block.attn.kv_cache
        for name in ("k", "v"):
            old = getattr(cache, name)
            grown = old.new_zeros(*old.shape[:2], size, *old.shape[3:])
            grown[:, :, :have] = old
            setattr(cache, name, grown)
        cache.max_cache_len = size
    model.mask_cache = build_mask_cache(size)


class LitGPTCandidate(ModuleCandidate):
    """`--cand litgpt`: the port above through its mapping."""

    def __init__(self, model_dir, dtype="float32"):
        super().__init__(f"{__name__}:load", model_dir, dtype)
        self.name = "litgpt"

    @staticmethod
    def check(model_dir, dtype="float32") -> None:
        """The port's check (`qwen3dbg.run.registry.check_candidate`) with this module as the port: litgpt
        imports, and the mapping resolves."""
        try:  # the package itself: its submodules may be cached by an earlier run in this process
            import litgpt  # noqa: F401
        except ImportError as e:
            raise UserError(f"litgpt's model code cannot be imported ({e}): {INSTALL}") from None
        ModuleCandidate.check(f"{__name__}:load", model_dir, dtype)
