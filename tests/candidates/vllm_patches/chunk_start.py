"""A chunk-boundary bug planted in vLLM's rotary embedding: a sequence's rows that continue an earlier
forward (a prefill chunk after the first) take their first row one position too early. A prompt computed
in one forward never shows it; with chunked prefill the second chunk's first position is wrong."""

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

original = RotaryEmbedding.forward_cpu


def forward_cpu(self, positions, query, key=None):
    metadata = get_forward_context().attn_metadata
    starts = next(iter(metadata.values())).query_start_loc.tolist()
    positions = positions.clone()
    for a, b in zip(starts, starts[1:]):
        if b - a > 1 and positions[a] > 0:  # a prefill chunk that is not the prompt's first
            positions[a] -= 1
    return original(self, positions, query, key)


RotaryEmbedding.forward_cpu = forward_cpu
