"""A GQA mapping bug planted in vLLM's attention: query head h reads kv head h % nKV instead of
h // (nH / nKV). vLLM's kernel maps head j to kv head j // n_rep, so the query heads go in reordered and
the output comes back in their order."""

import torch
from vllm.model_executor.layers.attention.attention import Attention

original = Attention.forward


def forward(self, query, key, value, *args, **kwargs):
    heads, kv = self.num_heads, self.num_kv_heads
    rep = heads // kv
    slot = torch.tensor([(h % kv) * rep + h // kv for h in range(heads)])  # the kernel slot of head h
    q = query.view(query.shape[0], heads, -1)
    moved = torch.empty_like(q)
    moved[:, slot] = q
    out = original(self, moved.view(query.shape), key, value, *args, **kwargs)
    return out.view(out.shape[0], heads, -1)[:, slot].reshape(out.shape)


Attention.forward = forward
