"""`run_diff`: the whole `qwen3dbg diff`. Three sides (reference, candidate, fp64 golden) run side by side and are
compared tap by tap as they go; then the first divergent op, introduced or inherited, and the diagnosis."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from qwen3dbg.diff.compare import ROUTER_OPS, Comparison
from qwen3dbg.diff.diagnosis.systematic import detect
import qwen3dbg.diff.guard as guard
from qwen3dbg.diff.golden import Keeper, LongGolden, golden_forced, golden_greedy
from qwen3dbg.diff.in_noise import InNoise
from qwen3dbg.diff.process_side import MIN_DECODE_STEPS, RemoteImplementation
from qwen3dbg.diff.noise import ABS_FLOOR_ULPS, ELEMENT_FACTOR, NORM_FACTOR, REL_FLOOR_ULPS, SMALL_SAMPLE_N0
from qwen3dbg.tapstore.shards import RankStores
from qwen3dbg.diff.result import DiffResult, Divergence, SideInfo, TapResult
from qwen3dbg.diff.streams import (
    RankSide,
    Schedule,
    StoreSide,
    ThreadSide,
    candidate_producer,
)
from qwen3dbg.diff.teacher import estimate, teacher_force
from qwen3dbg.diff.window import Window, WindowSource
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import ModelDir
from qwen3dbg.run.inputs import RunInputs
from qwen3dbg.run.plan import RunPlan, plan_run
from qwen3dbg.tapstore.schema import parse_tap_name
from qwen3dbg.tapstore.store import TapStore
from qwen3dbg.util import memory
from qwen3dbg.util.dtypes import dtype_name
from qwen3dbg.util.errors import UserError


def run_diff(
    ref: str = "hf",
    cand: str = "scratch",
    *,
    model_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    token_ids: Sequence[int] | None = None,
    decode_ids: Sequence[int] | None = None,
    decode_steps: int | None = None,
    prompt: str | None = None,
    **kwargs,
) -> DiffResult:
    """Compare `cand` with `ref` on the same ids, both judged against the fp64 golden; see docs/differ.md. The
    ids are RunInputs' fields; `kwargs` are `diff_plan`'s (teacher, status, progress)."""
    inputs = RunInputs(token_ids, prompt, decode_ids, decode_steps)
    return diff_plan(plan_run({"ref": ref, "cand": cand}, model_dir, inputs, dtype), **kwargs)


def diff_plan(
    plan: RunPlan,
    *,
    teacher: bool = True,
    status: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int | None], None] | None = None,
    ref_process: bool | None = None,
) -> DiffResult:
    """The diff of a resolved run (`plan_run`): the sides run side by side and are compared tap by tap as they
    go; nothing is written to disk. A live reference runs in a process of its own (`process_side`) with
    `ref_process`, or by default from MIN_DECODE_STEPS decode steps on."""
    t0 = time.perf_counter()
    memory.for_prefill()
    model, cfg, dt, steps, greedy = plan.model, plan.model.config, plan.dtype, plan.steps, plan.greedy
    specs = [plan.side("ref"), plan.side("cand")]
    for spec in specs:
        if spec.store is not None:
            _same_weights(spec.text, spec.store, model)
    timings: dict[str, float] = {}
    schedule = Schedule(steps, len(steps) + greedy)
    t = time.perf_counter()
    loaded, infos, lacks = {}, [SideInfo("gold", "scratch:float64", "scratch", "float64", "")], {}
    if ref_process is None:
        ref_process = len(steps) + greedy - 1 >= MIN_DECODE_STEPS
    remotes: list[RemoteImplementation] = []
    try:
        for role, spec in zip(("ref", "cand"), specs):
            if spec.store is not None:
                continue
            status(
                f"loading {role}: {spec.text}"
                + (" (its engine is built on first use: minutes)" if spec.name == "mine" else "")
                + (" (in a process of its own)" if role == "ref" and ref_process else "")
            )
            if role == "ref" and ref_process:  # it loads there while the candidate loads here
                loaded[role] = RemoteImplementation(spec, model.path, dt)
                remotes.append(loaded[role])
            else:
                loaded[role] = plan.load(role)
        for remote in remotes:
            remote.ready()
        for role, spec in zip(("ref", "cand"), specs):
            if spec.store is not None:
                store = spec.store
                lacks[role] = frozenset(store.missing_taps)
                notes = store.manifest.get("notes")
                notes = [str(n) for n in notes] if isinstance(notes, list) else []
                infos.append(
                    SideInfo(
                        role,
                        spec.text,
                        store.implementation,
                        dtype_name(store.dtype),
                        str(store.path),
                        notes,
                    )
                )
            else:
                lacks[role] = frozenset(loaded[role].missing_taps)
                infos.append(SideInfo(role, spec.text, loaded[role].name, dtype_name(dt), ""))
        golden = LongGolden(model, stream_weights=True if not greedy else None, one_pass=not greedy)
        timings["load"] = time.perf_counter() - t
        missing = lacks["ref"] | (lacks["cand"] - ROUTER_OPS)
        compared = lambda name: parse_tap_name(name)[1] not in missing  # noqa: E731
        keep = torch.float32 if dt.itemsize < 4 else torch.float64
        keeper = Keeper(keep)
        produce_gold = (
            golden_forced(golden, steps, keeper)
            if not greedy
            else golden_greedy(golden, schedule, steps[0].token_ids[0])
        )
        live = {role: spec.text for role, spec in zip(("ref", "cand"), specs) if spec.store is None}
        guard.check_taps_fit(cfg, steps[0], dt, live, compared, guard.available_bytes())
        sides = {"gold": ThreadSide("golden", produce_gold, compared, True, schedule)}
        for role, spec in zip(("ref", "cand"), specs):
            if spec.store is not None:
                sides[role] = (RankSide if isinstance(spec.store, RankStores) else StoreSide)(role, spec.store)
            elif isinstance(loaded[role], RemoteImplementation):
                sides[role] = loaded[role].side(role, schedule, missing, cut=role == "ref")
            else:
                sides[role] = ThreadSide(
                    role,
                    candidate_producer(loaded[role], schedule),
                    compared,
                    loaded[role].fresh_taps,
                    schedule,
                    cut=role == "ref",
                )
    except BaseException:  # the child of a remote reference ends with the run
        for remote in remotes:
            remote.close()
        raise
    window = Window(keep)
    src = WindowSource(cfg, schedule.steps, dt, model, {})
    noise = InNoise(cfg, src, window)
    shown = progress or (lambda step, layer: None)

    def on_progress(step: int, layer: int | None) -> None:
        if layer is None:  # a step is compared
            if step == 0:  # decode steps reuse their blocks
                memory.for_decode()
            memory.trim()
        shown(step, layer)

    comparison = Comparison(sides["gold"], sides["ref"], sides["cand"], schedule, cfg, dt, window, on_progress, lacks)
    status(f"comparing {schedule.total} step(s) against the fp64 golden")
    t = time.perf_counter()
    taps = []
    with guard.Watchdog(schedule.cancelled) as watchdog:
        try:
            for res in comparison.run():
                taps.append(res)
                noise.add(res)
                if watchdog.stopped:
                    break
        except Exception:  # a side cancelled by the watchdog ends its stream: what was compared stands
            if not watchdog.stopped:
                raise
        finally:
            for side in sides.values():
                side.close()
    stopped = watchdog.stopped
    window.finish()
    timings["compare"] = time.perf_counter() - t
    for info in infos:  # what an implementation has to say about its run (the device it ran on, its speed, ...)
        if info.role in loaded:
            info.notes = [str(n) for n in loaded[info.role].manifest_extra().get("notes", [])]
    t = time.perf_counter()
    first = next((r for r in taps if r.divergent), None)
    div = _divergence(first, taps, cfg) if first else None
    src.entries = window.frozen or {}
    if div is not None and teacher and "cand" in loaded and not stopped:  # no memory left for more forwards
        status("teacher forcing the divergent layer")
        forced = teacher_force(loaded["cand"], src, div, first, schedule.steps[div.step])
        div.origin = forced or div.origin
    status("diagnosing")
    diagnosis = [] if div is None or stopped else list(_diagnose(src, div))
    in_noise = noise.finding(dt)
    systematic = detect(taps, div, dt, cfg)
    timings["diagnose"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return DiffResult(
        model=str(model.path),
        config=cfg.to_hf_dict(),
        dtype=dtype_name(dt),
        sides=infos,
        steps=[
            {"step": s.step, "tokens": s.tokens, "token_ids": s.token_ids[0], "positions": s.positions[0]}
            for s in schedule.steps
        ],
        taps=taps,
        first_divergence=div,
        diagnosis=diagnosis,
        first_nonfinite=_first_nonfinite(taps, "cand"),
        golden_nonfinite=_first_nonfinite(taps, "gold"),
        in_noise=in_noise,
        systematic=systematic,
        routing_ties=comparison.ties,
        timings=timings,
        spilled=keeper.spilled,
        stopped=stopped,
        rule={
            "norm_factor": NORM_FACTOR,
            "element_factor": ELEMENT_FACTOR,
            "rel_floor_ulps": REL_FLOOR_ULPS,
            "abs_floor_ulps": ABS_FLOOR_ULPS,
            "small_sample_n0": SMALL_SAMPLE_N0,
        },
    )


def _same_weights(text: str, store: TapStore, model: ModelDir) -> None:
    """Refuse a store that `qwen3dbg capture` recorded on other weights than the model's (other stores record
    none): every difference would be the weights', a divergence no bug made."""
    recorded = store.manifest.get("weights_digest")
    here = None if recorded is None else model.checkpoint.digest()
    if recorded != here:
        raise UserError(
            f"{text} was captured on other weights than {model.path} (weights digest {recorded}, the model's "
            f"{here}): its differences would be the weights', not a bug; diff it with --model set to the model it "
            "was captured on"
        )


def _first_nonfinite(taps: list[TapResult], side: str) -> dict | None:
    """{"step", "tap", "count"} of the first tap where `side` ("cand" or "gold") holds NaN/inf."""
    return next(
        ({"step": r.step, "tap": r.name, "count": r.nonfinite[side]} for r in taps if r.nonfinite.get(side)), None
    )


def _divergence(first: TapResult, taps: list[TapResult], cfg: Qwen3Config) -> Divergence:
    div = Divergence(
        step=first.step,
        layer=first.layer,
        tap=first.name,
        op=first.op,
        reason=first.reason,
        excess=first.excess,
        max_abs=first.max_abs,
        rel_l2=first.rel_l2,
        worst=first.worst,
        ranks=first.extra.get("ranks", {}),
    )
    div.origin = estimate(div, {t.name: t for t in taps if t.step == first.step}, cfg)
    return div


def _diagnose(src: WindowSource, div: Divergence) -> list:
    from qwen3dbg.diff.diagnosis import diagnose

    return list(diagnose(src, div.step, div.tap))
