"""A RoPE bug planted in vLLM (`--cand vllm:patch=...`): rotary frequencies from theta 10000, whatever the
config's rope_theta (a hard-coded default)."""

from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

original = RotaryEmbeddingBase._compute_inv_freq
RotaryEmbeddingBase._compute_inv_freq = lambda self, base: original(self, 10000.0)
