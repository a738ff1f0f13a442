"""The differ: run or open three sides (reference, candidate, fp64 golden) side by side, compare them tap by
tap as they are produced, find the first divergent op, tell introduced from inherited, and ask the
diagnosis what kind of bug it is.

`run_diff(...) -> DiffResult` is the whole command; the CLI and the reports only render its result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from qwen3dbg.checkpoint import Checkpoint
from qwen3dbg.config import Qwen3Config
from qwen3dbg.diff.compare import ROUTER_OPS, Comparison
from qwen3dbg.diff.diagnosis.systematic import detect
from qwen3dbg.diff.golden import LongGolden
from qwen3dbg.diff.noise import ABS_FLOOR_ULPS, ELEMENT_FACTOR, NORM_FACTOR, REL_FLOOR_ULPS, SMALL_SAMPLE_N0
from qwen3dbg.diff.result import DiffResult, Divergence, Finding, SideInfo, TapResult
from qwen3dbg.diff.sides import SideSpec, check_sides, parse_side, store_steps
from qwen3dbg.diff.streams import (
    Keeper,
    Schedule,
    StoreSide,
    ThreadSide,
    candidate_producer,
    golden_forced,
    golden_greedy,
)
from qwen3dbg.diff.teacher import estimate, teacher_force
from qwen3dbg.diff.window import Window, WindowSource
from qwen3dbg.dtypes import dtype_name, parse_dtype
from qwen3dbg.errors import UserError
from qwen3dbg import memory
from qwen3dbg.store import TapStore
from qwen3dbg.taps import inputs_of, parse_tap_name

__all__ = ["run_diff", "DiffResult", "Divergence", "TapResult"]

DEFAULT_DTYPE = torch.bfloat16
#: an in-noise difference worth reporting: at least this many ulps (rms) apart from the reference ...
IN_NOISE_MIN_ULPS = 0.25
#: ... ranked by how much it exceeds its inputs' difference, counted as at least this many ulps
IN_NOISE_CARRIED_ULPS = 0.05


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
    if asked == torch.float64:
        raise UserError("--dtype float64 is the golden itself: test in float32, bfloat16 or float16")
    return asked or DEFAULT_DTYPE


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
    teacher: bool = True,
    status: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int | None], None] | None = None,
) -> DiffResult:
    """Compare `cand` with `ref` on the same ids, both judged against the fp64 golden; see docs/differ.md.
    The three sides run side by side and are compared tap by tap as they go; nothing is written to disk.
    The ids are the fields of `RunInputs` (the CLI's flags, parsed by `RunInputs.from_flags`)."""
    from qwen3dbg.inputs import RunInputs, resolve_model

    t0 = time.perf_counter()
    memory.for_prefill()
    inputs = RunInputs(token_ids, prompt, decode_ids, decode_steps)
    model_dir, cfg = resolve_model(Path(model_dir) if model_dir is not None else None)
    specs = [parse_side(ref, "ref", cfg), parse_side(cand, "cand", cfg)]
    dt = _dtype_under_test(specs, dtype)
    check_sides(specs, model_dir, dt)
    with_store = any(s.store is not None for s in specs)
    if with_store and inputs.picks_ids:
        raise UserError("a store fixes the token ids: leave out --prompt and --decode-steps")
    given = inputs.steps(model_dir, cfg)[0] if with_store and inputs != RunInputs() else None
    fixed = store_steps(specs, given)
    steps, greedy = (fixed, 0) if fixed else inputs.steps(model_dir, cfg)
    timings: dict[str, float] = {}
    schedule = Schedule(steps, len(steps) + greedy)
    t = time.perf_counter()
    loaded, infos, lacks = {}, [SideInfo("gold", "scratch:float64", "scratch", "float64", "")], {}
    for role, spec in zip(("ref", "cand"), specs):
        status(
            f"loading {role}: {spec.text}"
            + (" (its engine is built on first use: minutes)" if spec.name == "mine" else "")
        )
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
                    notes + _other_weights(store, model_dir),
                )
            )
        else:
            loaded[role] = _load(spec, model_dir, dt)
            lacks[role] = frozenset(loaded[role].missing_taps)
            infos.append(SideInfo(role, spec.text, loaded[role].name, dtype_name(dt), ""))
    golden = LongGolden(model_dir, stream_weights=not greedy or _large(model_dir))
    timings["load"] = time.perf_counter() - t
    missing = lacks["ref"] | (lacks["cand"] - ROUTER_OPS)
    compared = lambda name: parse_tap_name(name)[1] not in missing  # noqa: E731
    keep = torch.float32 if dt.itemsize < 4 else torch.float64
    keeper = Keeper(keep)
    produce_gold = (
        golden_forced(golden, steps, keeper) if not greedy else golden_greedy(golden, schedule, steps[0].token_ids[0])
    )
    sides = {"gold": ThreadSide("golden", produce_gold, compared, True, schedule)}
    for role, spec in zip(("ref", "cand"), specs):
        sides[role] = (
            StoreSide(role, spec.store)
            if spec.store is not None
            else ThreadSide(
                role, candidate_producer(loaded[role], schedule), compared, loaded[role].fresh_taps, schedule
            )
        )
    window = Window(keep)
    src = WindowSource(cfg, schedule.steps, dt, model_dir, {})
    noise = _InNoise(cfg, src, window)
    shown = progress or (lambda step, layer: None)

    def on_progress(step: int, layer: int | None) -> None:
        if step == 0 and layer is None:  # the prefill is compared: decode steps reuse their blocks
            memory.for_decode()
        shown(step, layer)

    comparison = Comparison(sides["gold"], sides["ref"], sides["cand"], schedule, cfg, dt, window, on_progress, lacks)
    status(f"comparing {schedule.total} step(s) against the fp64 golden")
    t = time.perf_counter()
    taps = []
    try:
        for res in comparison.run():
            taps.append(res)
            noise.add(res)
    finally:
        for side in sides.values():
            side.close()
    window.finish()
    for info in infos:  # what an implementation has to say about its run (the device it ran on, ...)
        if info.role in loaded:
            info.notes = [str(n) for n in loaded[info.role].manifest_extra().get("notes", [])]
    timings["compare"] = time.perf_counter() - t
    t = time.perf_counter()
    first = next((r for r in taps if r.divergent), None)
    div = _divergence(first, taps, cfg) if first else None
    src.entries = window.frozen or {}
    if div is not None and teacher and "cand" in loaded:
        status("teacher forcing the divergent layer")
        forced = teacher_force(loaded["cand"], src, div, first, schedule.steps[div.step])
        div.origin = forced or div.origin
    status("diagnosing")
    diagnosis = [] if div is None else list(_diagnose(src, div))
    in_noise = noise.finding(dt)
    systematic = detect(taps, div, dt)
    timings["diagnose"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return DiffResult(
        model=str(model_dir),
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
        rule={
            "norm_factor": NORM_FACTOR,
            "element_factor": ELEMENT_FACTOR,
            "rel_floor_ulps": REL_FLOOR_ULPS,
            "abs_floor_ulps": ABS_FLOOR_ULPS,
            "small_sample_n0": SMALL_SAMPLE_N0,
        },
    )


def _large(model_dir: Path) -> bool:
    """Stream the stepping golden's weights where holding them in float64 would pass 2 GB."""
    ckpt = Checkpoint(model_dir)
    return sum(torch.Size(ckpt.shape(n)).numel() for n in ckpt.keys()) * 8 > 2 * 1024**3


def _other_weights(store: TapStore, model_dir: Path) -> list[str]:
    """A note when `qwen3dbg capture` recorded other weights for this store than the model's: its
    differences from the other sides are then the weights' (other stores record none)."""
    recorded = store.manifest.get("weights_digest")
    here = None if recorded is None else Checkpoint(model_dir).digest()
    if recorded == here:
        return []
    return [
        f"captured on other weights than {model_dir} (weights digest {recorded}, the model's {here}): "
        "its differences are the weights'; diff it against the model it was captured on"
    ]


def _first_nonfinite(taps: list[TapResult], side: str) -> dict | None:
    """{"step", "tap", "count"} of the first tap where `side` ("cand" or "gold") holds NaN/inf."""
    return next(
        ({"step": r.step, "tap": r.name, "count": r.nonfinite[side]} for r in taps if r.nonfinite.get(side)), None
    )


def _load(spec: SideSpec, model_dir: Path, dt: torch.dtype):
    from qwen3dbg.registry import load_candidate

    return load_candidate(spec.name, model_dir, dt, **spec.options)


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
    )
    div.origin = estimate(div, {t.name: t for t in taps if t.step == first.step}, cfg)
    return div


def _diagnose(src: WindowSource, div: Divergence) -> list:
    from qwen3dbg.diff.diagnosis import diagnose

    return list(diagnose(src, div.step, div.tap))


class _InNoise:
    """The in-noise difference that most exceeds what its inputs carry (before any divergence), followed as
    the comparison streams: among taps differing from the reference by at least IN_NOISE_MIN_ULPS (rms) and
    by more than their inputs do (an input difference below IN_NOISE_CARRIED_ULPS counts as that much), the
    largest ratio of the two, times what magnifies a rounding there (an RMSNorm's largest weight, e.g.
    k_norm ~96.5: porters need that rounding point named, not the first one met). The window keeps the
    tensors of the best so far."""

    def __init__(self, cfg: Qwen3Config, src: WindowSource, window: Window):
        self.cfg, self.src, self.window = cfg, src, window
        self.best: TapResult | None = None
        self.best_rank, self.best_in, self.done = 0.0, 0.0, False
        self.step: dict[str, TapResult] = {}
        self.amplification: dict[str, float] = {}

    def add(self, r: TapResult) -> None:
        if self.done or r.divergent:
            self.done = True
            return
        if self.step and next(iter(self.step.values())).step != r.step:
            self.step = {}
        self.step[r.name] = r
        if r.status != "ok" or r.diff_ulps < IN_NOISE_MIN_ULPS:
            return
        inputs = inputs_of(r.name, self.cfg)
        carried = max((self.step[n].diff_ulps for n in inputs if n in self.step), default=0.0)
        own = r.diff_ulps / max(carried, IN_NOISE_CARRIED_ULPS)
        if own > 1.0 and (rank := own * self._amplification(r.name)) > self.best_rank:
            self.best, self.best_rank, self.best_in = r, rank, carried
            self.window.snapshot(r.step, [r.name, *inputs])

    def _amplification(self, name: str) -> float:
        from qwen3dbg.diff.diagnosis import amplification

        if name not in self.amplification:
            self.amplification[name] = amplification(self.src, name)
        return self.amplification[name]

    def finding(self, dt: torch.dtype) -> Finding | None:
        from qwen3dbg.diff.diagnosis import explain_rounding

        best = self.best
        if best is None:
            return None
        src = WindowSource(self.cfg, self.src.steps, self.src.dtype, self.src.model_dir, self.window.noise)
        explained = explain_rounding(src, best.step, best.name)
        if explained is not None:
            return Finding(
                best.step,
                best.name,
                best.diff_ulps,
                self.best_in,
                explained.message,
                explained.signature,
                dict(explained.evidence),
            )
        return Finding(
            best.step,
            best.name,
            best.diff_ulps,
            self.best_in,
            f"{best.name} differs from the reference by {best.diff_ulps:.2g} {dtype_name(dt)} ulps (rms) "
            f"while its inputs differ by {self.best_in:.2g}, within the noise floor; no replay stated a cause",
            "in_noise",
            {"diff_ulps": best.diff_ulps, "input_ulps": self.best_in},
        )
