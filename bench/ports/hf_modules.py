"""HF's own Qwen3 modules as a `module:` port, the way a new user maps them in minutes (bench_long's W case):
eager attention, a DynamicCache, attention scores and probabilities mapped (hf_modules.toml)."""

from __future__ import annotations

from pathlib import Path

import torch

TAP_MAPPING = Path(__file__).with_suffix(".toml")


class HFModules(torch.nn.Module):
    """Qwen3ForCausalLM called as `port(ids, positions=...)`, its cache emptied by `reset()`."""

    def __init__(self, model_dir, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        super().__init__()
        self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.hf.config)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=ids, position_ids=positions[None], past_key_values=self.cache, use_cache=True)
        return out.logits


def load(model_dir, dtype: torch.dtype) -> HFModules:
    return HFModules(model_dir, dtype)
