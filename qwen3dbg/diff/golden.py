"""The fp64 golden of a diff at any length, in bounded memory.

`LongGolden` is scratch in float64 that never holds what grows past a few hundred MB at real lengths: the
embedding and lm_head are read a vocabulary chunk at a time, layer weights stream (converted when the
layer runs, dropped after), attention runs in query blocks, and the attention matrices and logits are
handed out as `RowBlocks` computed on demand. Its arithmetic is scratch's: same ops, same float64.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from qwen3dbg.diff.blocks import BLOCK_ELEMENTS, RowBlocks
from qwen3dbg.model.model_dir import ModelDir, open_model
from qwen3dbg.reference.qwen3 import Qwen3Reference, causal_mask
from qwen3dbg.run.candidate import NullSink, emit
from qwen3dbg.tapstore.store import StepInfo, TapSink

#: vocabulary rows of the embedding / lm_head converted to float64 at a time (128 MB at hidden 1024)
VOCAB_CHUNK = 16384
#: logits per block (128 MB in float64): each block converts the whole lm_head again, so blocks are large
LOGITS_BLOCK_ELEMENTS = 1 << 24


class LongGolden(Qwen3Reference):
    """scratch in float64, weights streamed, attention in query blocks, logits and attention matrices lazy."""

    name = "scratch"

    def __init__(self, model: ModelDir | str | Path, *, stream_weights: bool | None = None):
        """`stream_weights` None: stream where holding the weights in float64 would pass 2 GB."""
        model = open_model(model, check_layout=False)
        if stream_weights is None:
            ckpt = model.checkpoint
            stream_weights = sum(torch.Size(ckpt.shape(n)).numel() for n in ckpt.keys()) * 8 > 2 * 1024**3
        super().__init__(model, "float64", stream_weights=stream_weights)

    def _head(self) -> str:
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def embed(self, ids):
        """Rows of the embedding for `ids` [B,T], read a vocabulary chunk at a time."""
        out = torch.empty(*ids.shape, self.config.hidden_size, dtype=self.dtype)
        flat, dst = ids.reshape(-1), out.view(-1, self.config.hidden_size)
        for v0 in range(0, self.config.vocab_size, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, self.config.vocab_size)
            hit = ((flat >= v0) & (flat < v1)).nonzero().flatten()
            if hit.numel():
                dst[hit] = self.w.ckpt.rows("model.embed_tokens.weight", v0, v1, self.dtype)[flat[hit] - v0]
        return out

    def attend(self, i, q, k_all, v_all, positions, sink):
        """scratch's attention one block of queries at a time: no [T,S] matrix is ever whole."""
        B, nH, T, _ = q.shape
        S = k_all.shape[2]

        def scores(r0: int, r1: int) -> torch.Tensor:
            return self.scores(q[:, :, r0:r1], k_all, causal_mask(positions[:, r0:r1], S))

        def probs(r0: int, r1: int) -> torch.Tensor:
            return self.probs(scores(r0, r1))

        shape = (B, nH, T, S)
        for op, fn in (("attn_scores", scores), ("attn_probs", probs)):
            emit(sink, i, op, RowBlocks(shape, 2, fn))
        rows = max(1, BLOCK_ELEMENTS // (B * nH * S))
        return torch.cat([self.context(probs(r, min(r + rows, T)), v_all) for r in range(0, T, rows)], dim=1)

    def logits(self, x):
        """x [B,T,H] -> RowBlocks of logits [B,T,V]: each run of rows multiplies the head a chunk at a time."""
        V = self.config.vocab_size

        def rows(r0: int, r1: int) -> torch.Tensor:
            xs = x[:, r0:r1]
            out = torch.empty(*xs.shape[:-1], V, dtype=self.dtype)
            for v0 in range(0, V, VOCAB_CHUNK):
                v1 = min(v0 + VOCAB_CHUNK, V)
                out[..., v0:v1] = F.linear(xs, self.w.ckpt.rows(self._head(), v0, v1, self.dtype))
            return out

        return RowBlocks((*x.shape[:-1], V), 1, rows, block_elements=LOGITS_BLOCK_ELEMENTS)


def last_logits(logits: RowBlocks) -> torch.Tensor:
    """The last token's logits [B,V] (a greedy pick needs nothing else)."""
    return logits.take(logits.rows - 1, logits.rows)[:, -1]


def greedy_steps(
    golden: LongGolden, prompt: list[int], total: int, sink: TapSink, end_step: Callable[[], None] = lambda: None
) -> Iterator[StepInfo]:
    """The one greedy picker (`--decode-steps`): the golden runs `total` steps from `prompt`, each decode step fed
    the token the step before picked. Each step is yielded before it runs, so a caller may publish its ids to the
    other sides, or stop once it has the ids it needs."""
    golden.reset()
    info = StepInfo(0, [list(prompt)], [list(range(len(prompt)))])
    for s in range(total):
        yield info
        logits = golden.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        end_step()
        info = StepInfo(s + 1, [[int(last_logits(logits)[0].argmax())]], [[len(prompt) + s]])


def pick_steps(model: ModelDir, prompt: list[int], decode: int) -> list[StepInfo]:
    """The prefill and `decode` greedy steps, their ids picked by the fp64 golden before any side runs."""
    return list(itertools.islice(greedy_steps(LongGolden(model), prompt, decode + 1, NullSink()), decode + 1))
