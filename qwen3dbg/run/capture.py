"""Running an implementation over forced steps and streaming its taps into a store.

Every side of a comparison sees the same token ids: the prompt is the prefill (step 0) and each
decode step feeds a token fixed in advance, either given or the greedy choice of the fp64 golden.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from pathlib import Path
from typing import Callable

import torch

from qwen3dbg.run.candidate import Candidate, DictSink, NullSink
from qwen3dbg.tapstore.schema import select, step_taps
from qwen3dbg.tapstore.store import StepInfo, StoreWriter, TapSink
from qwen3dbg.util import memory
from qwen3dbg.util.errors import UserError


def forced_steps(prompt: list[int], decode: list[int]) -> list[StepInfo]:
    """Step 0 prefills the prompt; step s > 0 feeds decode[s-1] at position len(prompt) + s - 1."""
    n = len(prompt)
    steps = [StepInfo(0, [list(prompt)], [list(range(n))])]
    steps += [StepInfo(s + 1, [[tok]], [[n + s]]) for s, tok in enumerate(decode)]
    return steps


def greedy_decode_ids(golden: Candidate, prompt: list[int], n: int) -> list[int]:
    """The tokens an fp64 run picks greedily: the decode inputs every implementation is then forced to."""
    golden.reset()
    chosen: list[int] = []
    for info in forced_steps(prompt, [0] * n)[:n]:
        ids = torch.tensor(info.token_ids if info.step == 0 else [[chosen[-1]]])
        logits = golden.step(ids, torch.tensor(info.positions), NullSink())
        chosen.append(int(logits[0, -1].argmax()))
    return chosen


def run_steps(cand: Candidate, steps: list[StepInfo], device: torch.device | str | None = None) -> list[dict]:
    """Run a candidate over forced steps keeping every tap in memory, on the CPU: per step, name -> tensor.
    For small runs (tests, the GPU selftest); a capture streams to a store instead."""
    cand.reset()
    out = []
    for info in steps:
        sink = DictSink()
        cand.step(torch.tensor(info.token_ids, device=device), torch.tensor(info.positions, device=device), sink)
        out.append({n: t.cpu() for n, t in sink.taps.items()})
    return out


def step_plan(cand: Candidate, info: StepInfo) -> dict[str, tuple[int, ...]]:
    """Every tap `cand` produces in this step, with its shape (the cache then holds positions 0..last; the
    logits the rows of `info.logits_positions`, where the step declares them)."""
    specs = step_taps(cand.config, len(info.token_ids), info.tokens, info.positions[0][-1] + 1)
    plan = {t.name: t.shape for t in specs if t.op not in cand.missing_taps}
    if info.logits_positions is not None and "logits" in plan:
        b, _, v = plan["logits"]
        plan["logits"] = (b, len(info.logits_positions), v)
    return plan


def with_rows(cand: Candidate, info: StepInfo) -> StepInfo:
    """The step as `cand` will compute it: with the rows of its logits where it computes some only."""
    rows = cand.logits_positions(info)
    return info if rows is None or rows == info.positions[0] else replace(info, logits_positions=rows)


def planned(cand: Candidate, steps: list[StepInfo], patterns: list[str] | None) -> list[dict[str, tuple[int, ...]]]:
    """Per step, the taps a capture will write (those `patterns` select) and their shapes."""
    plans = []
    for info in steps:
        plan = step_plan(cand, with_rows(cand, info))
        plans.append({n: plan[n] for n in select(list(plan), patterns)})
    if not any(plans):
        raise UserError(f"--taps {patterns} matches no tap name (see docs/taps.md for the names)")
    return plans


def estimate_bytes(cand: Candidate, plans: list[dict[str, tuple[int, ...]]]) -> int:
    """What a capture will write, counted before it starts (attention matrices grow with T x S)."""
    item = cand.dtype.itemsize
    return sum(
        prod(shape) * (8 if name.endswith("topk_ids") else item) for plan in plans for name, shape in plan.items()
    )


class _Progress:
    """A sink wrapper that ticks a callback once per tap written."""

    def __init__(self, sink: TapSink, tick: Callable[[], None]):
        self.sink, self.tick = sink, tick

    def wants(self, name: str) -> bool:
        return self.sink.wants(name)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.sink(name, tensor)
        self.tick()


def store_writer(
    cand: Candidate,
    out_dir: str | Path,
    batch: int,
    *,
    select: set[str] | None = None,
    extra: dict | None = None,
    replace: bool = False,
) -> StoreWriter:
    """A store for `cand`'s taps whose manifest says what ran (device, numerics, config)."""
    manifest = {**cand.manifest_extra(), "config": cand.config.to_hf_dict(), **(extra or {})}
    return StoreWriter(
        out_dir,
        cand.name,
        cand.dtype,
        batch,
        select=select,
        missing_taps=cand.missing_taps,
        extra=manifest,
        replace=replace,
    )


def capture_step(cand: Candidate, writer: StoreWriter, info: StepInfo, sink: TapSink | None = None) -> torch.Tensor:
    """One step of `cand` with its taps streamed into `writer` (through `sink`, default the writer)."""
    info = with_rows(cand, info)
    writer.begin_step(info, step_plan(cand, info))
    logits = cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink or writer)
    writer.end_step()
    return logits


def capture(
    cand: Candidate,
    steps: list[StepInfo],
    out_dir: str | Path,
    *,
    patterns: list[str] | None = None,
    tick: Callable[[], None] = lambda: None,
    extra: dict | None = None,
    replace: bool = False,
) -> Path:
    """Run every step through `cand` and write a complete tap store at `out_dir` (`replace`: over a store there)."""
    plans = planned(cand, steps, patterns)
    cand.reset()
    kept = {"taps": list(patterns)} if patterns else {}  # a selection: the other taps are not expected
    with store_writer(
        cand,
        out_dir,
        len(steps[0].token_ids),
        select=set().union(*plans),
        extra={**kept, **(extra or {})},
        replace=replace,
    ) as writer:
        sink = _Progress(writer, tick)
        for info in steps:
            capture_step(cand, writer, info, sink)
            memory.trim()  # the holes a cache grown by concatenation leaves (util/memory.py)
    return Path(out_dir)
