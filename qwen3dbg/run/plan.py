"""A run resolved once, for `capture` and `diff` alike: the model opened, the sides checked, the dtype and the
steps fixed. The flags were parsed before (inputs.py, sides.py); this is where the model is first read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3dbg.model.model_dir import ModelDir, open_model
from qwen3dbg.run.candidate import Candidate
from qwen3dbg.run.capture import forced_steps
from qwen3dbg.run.inputs import RunInputs
from qwen3dbg.run.registry import check_candidate, construct
from qwen3dbg.run.sides import SideSpec, open_store, parse_side, store_steps
from qwen3dbg.tapstore.store import StepInfo
from qwen3dbg.util.dtypes import dtype_name, parse_dtype
from qwen3dbg.util.errors import UserError

DEFAULT_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class RunPlan:
    model: ModelDir
    sides: tuple[SideSpec, ...]  # parsed, stores opened, implementations checked: each loads without a check
    dtype: torch.dtype
    steps: list[StepInfo]  # the steps whose ids are fixed now
    greedy: int  # decode steps after them whose ids the fp64 golden picks greedily

    def side(self, role: str) -> SideSpec:
        return next(s for s in self.sides if s.role == role)

    def load(self, role: str) -> Candidate:
        """The implementation of side `role`, loaded on the plan's opened model (checked when planned)."""
        spec = self.side(role)
        return construct(spec.name, self.model, self.dtype, **spec.options)


def plan_run(
    sides: list[SideSpec] | dict[str, str],
    model: str | Path | ModelDir | None = None,
    inputs: RunInputs = RunInputs(),
    dtype: str | torch.dtype | None = None,
) -> RunPlan:
    """Resolve a run: `sides` parsed by `parse_side` (or {role: text}), the model directory (None: the embedded
    default), the ids asked for and the dtype (None: a store's own, else bfloat16). Everything a side would
    refuse is refused here, before any weights load."""
    specs = [parse_side(text, role) for role, text in sides.items()] if isinstance(sides, dict) else list(sides)
    model = open_model(model)
    specs = [open_store(s, model.config) if s.store_paths else s for s in specs]
    dt = _dtype_under_test(specs, dtype)
    for spec in specs:
        if spec.store is None:
            check_candidate(spec.name, model, dt, **spec.options)
    with_store = any(s.store is not None for s in specs)
    if with_store and inputs.picks_ids:
        raise UserError("a store fixes the token ids: leave out --prompt and --decode-steps")
    given = None
    if with_store and inputs != RunInputs():
        given = forced_steps(*inputs.ids(model.path, model.config)[:2])
    fixed = store_steps(specs, given)
    if fixed:
        return RunPlan(model, tuple(specs), dt, fixed, 0)
    prompt, decode, greedy = inputs.ids(model.path, model.config)
    return RunPlan(model, tuple(specs), dt, forced_steps(prompt, decode), greedy)


def with_greedy_ids(plan: RunPlan, picked: list[StepInfo]) -> RunPlan:
    """The plan with its greedy steps' ids fixed (a capture needs them all before its one side runs)."""
    return dataclasses.replace(plan, steps=picked, greedy=0)


def _dtype_under_test(specs: list[SideSpec], dtype: str | torch.dtype | None) -> torch.dtype:
    """A store fixes the dtype; an explicit --dtype must agree with it; otherwise bfloat16."""
    stored = {s.text: s.store.dtype for s in specs if s.store is not None}
    if len(set(stored.values())) > 1:
        raise UserError(
            "the two stores hold different dtypes ("
            + ", ".join(f"{k}: {dtype_name(v)}" for k, v in stored.items())
            + "): capture both in the dtype under test"
        )
    asked = parse_dtype(dtype) if dtype is not None else None
    if stored:
        found = next(iter(stored.values()))
        if asked is not None and asked != found:
            raise UserError(
                f"--dtype {dtype_name(asked)} but {next(iter(stored))} holds {dtype_name(found)}: "
                "leave out --dtype or capture the store in that dtype"
            )
        return found
    if asked == torch.float64 and any(s.role != "impl" for s in specs):
        raise UserError("--dtype float64 is the golden itself: test in float32, bfloat16 or float16")
    return asked or DEFAULT_DTYPE
