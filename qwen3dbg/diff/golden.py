"""The fp64 golden of a diff at any length in bounded memory: `LongGolden` (scratch's arithmetic, weights streamed,
attention in query blocks), the one greedy picker, and its side of a diff: one pass over the whole forced
sequence whose prefill rows stream and whose decode rows are kept (`Keeper`) and replayed as decode steps."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from qwen3dbg.diff.blocks import BLOCK_ELEMENTS, RowBlocks
from qwen3dbg.diff.streams import CACHE_OPS, CacheSlots, QueueSink, Schedule
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import ModelDir, open_model
from qwen3dbg.reference.qwen3 import Qwen3Reference, causal_mask
from qwen3dbg.run.candidate import NullSink, emit
from qwen3dbg.tapstore.schema import OPS_BY_NAME, parse_tap_name, step_taps
from qwen3dbg.tapstore.store import StepInfo, TapSink
from qwen3dbg.util.home import home

#: vocabulary rows of the embedding / lm_head converted to float64 at a time (128 MB at hidden 1024)
VOCAB_CHUNK = 16384
#: logits per block (128 MB in float64): each block converts the whole lm_head again, so blocks are large
LOGITS_BLOCK_ELEMENTS = 1 << 24


class LongGolden(Qwen3Reference):
    """scratch in float64 that never holds what grows past a few hundred MB at real lengths: the embedding and
    lm_head read a vocabulary chunk at a time, attention in query blocks, logits and attention matrices lazy."""

    name = "scratch"

    def __init__(self, model: ModelDir | str | Path, *, stream_weights: bool | None = None, one_pass: bool = False):
        """`stream_weights` None: stream where holding the weights in float64 would pass 2 GB. `one_pass`: the
        golden of forced ids, one forward over the whole sequence and no step after it, so no layer keeps its
        keys and values past its own attention (float64 over 2304 tokens of the 0.6B shape: 1.06 GB)."""
        model = open_model(model, check_layout=False)
        if stream_weights is None:
            stream_weights = model.checkpoint.numel() * 8 > 2 * 1024**3
        self.one_pass = one_pass
        super().__init__(model, "float64", stream_weights=stream_weights)

    def update_cache(self, layer, k, v):
        return (k, v) if self.one_pass else super().update_cache(layer, k, v)

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


def golden_greedy(golden, schedule: Schedule, prompt: list[int]) -> Callable[[QueueSink], None]:
    """The golden stepping like any side and picking each next token greedily (`--decode-steps`): the pass
    that picks the ids is the golden itself, never a second fp64 pass."""

    def produce(sink: QueueSink) -> None:
        for info in greedy_steps(golden, prompt, schedule.total, sink, sink.end_step):
            if info.step == len(schedule.steps):
                schedule.publish(info)

    return produce


#: bytes of kept rows held in anonymous memory: a short run's rows (a few MB) never touch a file; past that
#: the rows grow through the whole prefill, and anonymous memory, unlike the file's pages, cannot be dropped
KEPT_IN_MEMORY = 32 << 20


class Keeper:
    """The golden's kept rows: in memory up to `in_memory` bytes, past that in pages of a file that is deleted
    as soon as it is mapped, which the kernel may write back and drop under pressure (the decode rows of
    2048 + 256 tokens on the 0.6B shape are 1.5 GB: with two HF models beside them, memory would not hold)."""

    def __init__(self, dtype: torch.dtype, in_memory: int = KEPT_IN_MEMORY):
        self.dtype, self.in_memory = dtype, in_memory
        self.held = self.spilled = 0
        self.rows: dict[str, torch.Tensor] = {}

    def keep(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if t.is_floating_point() else t.dtype
        size = t.numel() * dtype.itemsize
        if self.held + size <= self.in_memory:
            self.held += size
            kept = t.to(dtype, copy=True)
        else:
            self.spilled += size
            kept = _file_backed(t.shape, dtype).copy_(t)
        self.rows[name] = kept
        return kept


def _file_backed(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    directory = home("tmp")
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=directory, prefix=".golden-rows-")
    n = math.prod(shape)
    try:
        os.ftruncate(fd, max(n, 1) * dtype.itemsize)
        os.close(fd)
        return torch.from_file(path, shared=True, size=max(n, 1), dtype=dtype)[:n].view(shape)
    finally:
        os.unlink(path)  # the mapping outlives the name: nothing is left behind, even after a crash


def golden_forced(golden, steps: list[StepInfo], keeper: Keeper) -> Callable[[QueueSink], None]:
    """One pass of the golden over prompt + every forced decode id; step 0 streams the prefill's rows,
    steps 1.. replay the kept rows of the decode tokens."""
    cfg: Qwen3Config = golden.config
    P = steps[0].tokens
    ids = steps[0].token_ids[0] + [s.token_ids[0][0] for s in steps[1:]]
    kept = keeper.rows

    def produce(sink: QueueSink) -> None:
        prefill = _PrefillSlicer(sink, P, keeper)
        golden.reset()
        with torch.no_grad():
            golden.step(torch.tensor([ids]), torch.tensor([list(range(len(ids)))]), prefill)
        sink.end_step()
        for info in steps[1:]:
            _replay_decode(golden, cfg, info, P, kept, sink)
            sink.end_step()

    return produce


class _PrefillSlicer:
    """Between the golden's whole-sequence pass and the queue: hands on the prompt's rows (and, for the cache
    and attention, its first P slots) and keeps the decode tokens' rows for later steps."""

    def __init__(self, sink: QueueSink, prompt_len: int, keeper: Keeper):
        self.sink, self.P, self.keeper = sink, prompt_len, keeper

    def wants(self, name: str) -> bool:
        op = parse_tap_name(name)[1]
        # q_rope and the cache are kept for the decode steps' attention even when nothing compares them now
        return self.sink.wants(name) or op in CACHE_OPS or op == "q_rope"

    def __call__(self, name: str, t) -> None:
        op = parse_tap_name(name)[1]
        axes = OPS_BY_NAME[op].axes
        P = self.P
        if isinstance(t, RowBlocks):
            head = t.restrict(0, P, cols=P if axes[-1] == "S" else None)
            if op == "logits" and t.rows > P:
                self.keeper.keep(name, _rows_of(t, P, self.keeper.dtype))
        elif op in CACHE_OPS:  # kept whole for the decode steps; the prefill's slots are a view of it
            head = self.keeper.keep(name, t).narrow(2, 0, P)
        else:
            head = t
            for axis in ("T", "S"):
                if axis in axes:
                    head = head.narrow(axes.index(axis), 0, P)
            if "T" in axes and t.shape[axes.index("T")] > P:
                self.keeper.keep(name, t.narrow(axes.index("T"), P, t.shape[axes.index("T")] - P))
        if self.sink.wants(name):
            self.sink(name, head)


def _rows_of(blocks: RowBlocks, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of a RowBlocks tap, materialised block by block in `dtype`."""
    tail = blocks.restrict(start, blocks.rows)
    return torch.cat([b.to(dtype) for _, b in tail.blocks()], dim=blocks.axis)


def _replay_decode(golden, cfg: Qwen3Config, info: StepInfo, P: int, kept: dict, sink: QueueSink) -> None:
    """Decode step `info` of the golden from the kept rows: row j = step - 1 of every token tap, the cache
    slot it wrote, and its attention row recomputed in float64 from the kept queries and cache."""
    j, p = info.step - 1, info.positions[0][0]
    for spec in step_taps(cfg, 1, 1, p + 1):
        name, op = spec.name, spec.op
        if not sink.wants(name):
            continue
        if op in CACHE_OPS:
            full = kept[name]
            sink(name, CacheSlots(full[:, :, p : p + 1], [p], full[:, :, : p + 1]))
        elif op in ("attn_scores", "attn_probs"):
            layer = spec.layer
            q = kept[f"layers.{layer}.q_rope"][:, j : j + 1].transpose(1, 2).double()
            k = kept[f"layers.{layer}.k_cache"][:, :, : p + 1].double()
            scores = golden.scores(q, k, causal_mask(torch.tensor([[p]]), p + 1))
            sink(name, scores if op == "attn_scores" else golden.probs(scores))
        else:
            sink(name, kept[name].narrow(spec.axes.index("T"), j, 1))
