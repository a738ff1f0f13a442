"""A bug that shows only in a batch, planted in vLLM's rotary embedding: positions are taken as the first
sequence's first position plus the row's index in the flat token axis, as an engine written for one
sequence at a time would. Alone (one sequence per forward) that is right; beside another sequence the
later sequences' rows get the wrong positions."""

import torch
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

original = RotaryEmbedding.forward_cpu


def forward_cpu(self, positions, query, key=None):
    flat = positions[0] + torch.arange(positions.shape[0], dtype=positions.dtype)
    return original(self, flat, query, key)


RotaryEmbedding.forward_cpu = forward_cpu
