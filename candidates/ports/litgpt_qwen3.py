"""litgpt's own Qwen3 and Qwen3-MoE (`litgpt.model.GPT`) as a candidate: `--cand litgpt`. Its taps come through
candidates/mappings/litgpt_qwen3.toml; this file builds litgpt's config and loads the weights with its converter."""

from __future__ import annotations

from pathlib import Path

import torch
from qwen3dbg.candidates.module_adapter import ModuleCandidate

from qwen3dbg.model.config import Qwen3Config, load_config
from qwen3dbg.util.errors import UserError

TAP_MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "litgpt_qwen3.toml"
# litgpt 0.5.13 pins huggingface-hub<1.4, which would drag transformers down, while its model code runs with
# ours: install it without its dependencies, then what that code imports (docs/ports.md).
INSTALL = "pip install --no-deps litgpt==0.5.13 && pip install '.[litgpt]' in the qwen3dbg checkout"
#: litgpt allocates its KV cache for the whole context up front: cap it as the standalone port does
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
    """The factory: litgpt's GPT with the checkpoint's weights and a KV cache for one sequence."""
    try:
        from litgpt.model import GPT
        from litgpt.scripts.convert_hf_checkpoint import copy_weights_qwen_3
    except ImportError as e:
        raise UserError(f"litgpt's model code cannot be imported ({e}): {INSTALL}") from None
    from safetensors.torch import load_file

    config = litgpt_config(load_config(model_dir))
    hf_weights = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        hf_weights.update(load_file(str(f)))
    state: dict[str, torch.Tensor] = {}
    copy_weights_qwen_3(config, {}, state, hf_weights)
    model = GPT(config)
    model.load_state_dict(state)
    model = model.to(dtype).eval()
    model.set_kv_cache(batch_size=1)
    forward = model.forward

    def filled(idx: torch.Tensor, input_pos: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # As litgpt's own generate calls it: attention over the positions filled so far, not the whole
        # MAX_SEQ-slot cache behind a mask (at a 2048-token prompt that was 4x the scores' memory and work).
        if input_pos is not None:
            kwargs.setdefault("input_pos_maxp1", int(input_pos.max()) + 1)
        return forward(idx, input_pos, **kwargs)

    model.forward = filled
    return model


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
