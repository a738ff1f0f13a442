"""The differ: run or open three sides (reference, candidate, fp64 golden), compare them tap by tap,
find the first divergent op, tell introduced from inherited, and ask the diagnosis what kind of bug it is.

`run_diff(...) -> DiffResult` is the whole command; the CLI and the reports only render its result.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from qwen3dbg.checkpoint import Checkpoint
from qwen3dbg.config import Qwen3Config
from qwen3dbg.diff.compare import Comparison
from qwen3dbg.diff.noise import ABS_FLOOR_ULPS, ELEMENT_FACTOR, NORM_FACTOR, REL_FLOOR_ULPS, SMALL_SAMPLE_N0
from qwen3dbg.diff.result import DiffResult, Divergence, Finding, SideInfo, TapResult
from qwen3dbg.diff.runs import REFERENCES, cached_run, fresh_run, runs_home
from qwen3dbg.diff.sides import SideSpec, parse_side, store_steps
from qwen3dbg.diff.teacher import estimate, teacher_force
from qwen3dbg.dtypes import dtype_name, parse_dtype
from qwen3dbg.errors import UserError
from qwen3dbg.store import StepInfo, TapStore
from qwen3dbg.taps import inputs_of

__all__ = ["run_diff", "DiffResult", "Divergence", "TapResult"]

DEFAULT_DTYPE = torch.bfloat16
#: an in-noise difference worth reporting: at least this many ulps (rms) apart from the reference ...
IN_NOISE_MIN_ULPS = 0.25
#: ... ranked by how much it exceeds its inputs' difference, counted as at least this many ulps
IN_NOISE_CARRIED_ULPS = 0.05


@dataclass
class StoreSource:
    """The diagnosis' view of a diff (qwen3dbg.diagnosis.TapSource): three stores and the checkpoint."""

    config: Qwen3Config
    steps: list[StepInfo]
    dtype: torch.dtype
    ref_store: TapStore
    cand_store: TapStore
    gold_store: TapStore
    model_dir: Path

    def _get(self, store: TapStore, step: int, name: str) -> torch.Tensor | None:
        return store.get(step, name) if step < len(store.steps) and store.has(step, name) else None

    def ref(self, step: int, name: str) -> torch.Tensor | None:
        return self._get(self.ref_store, step, name)

    def cand(self, step: int, name: str) -> torch.Tensor | None:
        return self._get(self.cand_store, step, name)

    def gold(self, step: int, name: str) -> torch.Tensor | None:
        return self._get(self.gold_store, step, name)

    @cached_property
    def _checkpoint(self):
        from qwen3dbg.checkpoint import Checkpoint

        return Checkpoint(self.model_dir)

    def weight(self, name: str) -> torch.Tensor | None:
        return self._checkpoint.get(name) if name in self._checkpoint else None


def _ids_text(ids: list[int] | str | None) -> str | None:
    return ",".join(map(str, ids)) if isinstance(ids, (list, tuple)) else ids


def _dtype_under_test(specs: list[SideSpec], dtype: str | torch.dtype | None) -> torch.dtype:
    """A store fixes the dtype; an explicit --dtype must agree with it; otherwise bfloat16."""
    stored = {s.text: s.store.dtype for s in specs if s.store is not None}
    if len(set(stored.values())) > 1:
        raise UserError("the two stores hold different dtypes (" + ", ".join(f"{k}: {dtype_name(v)}" for k, v in stored.items())
                        + "): capture both in the dtype under test")
    asked = parse_dtype(dtype) if dtype is not None else None
    if stored:
        found = next(iter(stored.values()))
        if asked is not None and asked != found:
            raise UserError(f"--dtype {dtype_name(asked)} but {next(iter(stored))} holds {dtype_name(found)}: "
                            "leave out --dtype or capture the store in that dtype")
        return found
    if asked == torch.float64:
        raise UserError("--dtype float64 is the golden itself: test in float32, bfloat16 or float16")
    return asked or DEFAULT_DTYPE


def run_diff(ref: str = "hf", cand: str = "scratch", *, model_dir: str | Path | None = None,
             dtype: str | torch.dtype | None = None, token_ids: list[int] | str | None = None,
             decode_ids: list[int] | str | None = None, decode_steps: int | None = None, prompt: str | None = None,
             teacher: bool = True, status: Callable[[str], None] = lambda msg: None) -> DiffResult:
    """Compare `cand` with `ref` on the same ids, both judged against the fp64 golden; see docs/differ.md."""
    from qwen3dbg.inputs import resolve_model, resolve_steps

    t0 = time.perf_counter()
    model_dir, cfg = resolve_model(Path(model_dir) if model_dir is not None else None)
    specs = [parse_side(ref, "ref"), parse_side(cand, "cand")]
    dt = _dtype_under_test(specs, dtype)
    with_store = any(s.store is not None for s in specs)
    if with_store and (prompt is not None or decode_steps is not None):
        raise UserError("a store fixes the token ids: leave out --prompt and --decode-steps")
    given = resolve_steps(model_dir, cfg, _ids_text(token_ids), None, _ids_text(decode_ids), None) \
        if with_store and (token_ids is not None or decode_ids is not None) else None
    steps = store_steps(specs, cfg, given) or resolve_steps(
        model_dir, cfg, _ids_text(token_ids), prompt, _ids_text(decode_ids), decode_steps)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=".diff-", dir=runs_home()) as work:
        status("fp64 golden (scratch in float64)")
        t = time.perf_counter()
        gold, gold_cached = cached_run("scratch", {}, model_dir, steps, torch.float64)
        timings["golden"] = time.perf_counter() - t
        stores, loaded, infos = {}, {}, [SideInfo("gold", "scratch:float64", "scratch", "float64", str(gold.path), gold_cached)]
        for role, spec in zip(("ref", "cand"), specs):
            t = time.perf_counter()
            cached = False
            if spec.store is not None:
                store = spec.store
            elif spec.name in REFERENCES:
                status(f"{role}: {spec.text} in {dtype_name(dt)}")
                store, cached = cached_run(spec.name, spec.options, model_dir, steps, dt)
            else:
                status(f"{role}: {spec.text} in {dtype_name(dt)}")
                store, loaded[role] = fresh_run(spec.name, spec.options, model_dir, steps, dt, Path(work))
            timings[role] = time.perf_counter() - t
            stores[role] = store
            notes = store.manifest.get("notes")
            notes = [str(n) for n in notes] if isinstance(notes, list) else []
            infos.append(SideInfo(role, spec.text, store.implementation, dtype_name(store.dtype), str(store.path), cached,
                                  notes + _other_weights(store, model_dir)))
        status("comparing")
        t = time.perf_counter()
        comparison = Comparison(gold, stores["ref"], stores["cand"], cfg, dt)
        taps = list(comparison.run())
        timings["compare"] = time.perf_counter() - t
        src = StoreSource(cfg, steps, dt, stores["ref"], stores["cand"], gold, model_dir)
        first = next((r for r in taps if r.divergent), None)
        div = _divergence(first, taps, cfg) if first else None
        if div is not None and teacher and specs[1].name is not None:
            candidate = loaded.get("cand") or _load(specs[1], model_dir, dt)
            forced = teacher_force(candidate, stores["ref"], gold, div, first, steps[div.step])
            div.origin = forced or div.origin
        diagnosis = _diagnose(src, div)
        in_noise = _in_noise(src, taps, div, cfg, dt)
    timings["total"] = time.perf_counter() - t0
    return DiffResult(
        model=str(model_dir), config=cfg.to_hf_dict(), dtype=dtype_name(dt), sides=infos,
        steps=[{"step": s.step, "tokens": s.tokens, "token_ids": s.token_ids[0], "positions": s.positions[0]} for s in steps],
        taps=taps, first_divergence=div, diagnosis=diagnosis, first_nonfinite=_first_nonfinite(taps, "cand"),
        golden_nonfinite=_first_nonfinite(taps, "gold"), in_noise=in_noise,
        routing_ties=comparison.ties, timings=timings,
        rule={"norm_factor": NORM_FACTOR, "element_factor": ELEMENT_FACTOR, "rel_floor_ulps": REL_FLOOR_ULPS,
              "abs_floor_ulps": ABS_FLOOR_ULPS, "small_sample_n0": SMALL_SAMPLE_N0})


def _other_weights(store: TapStore, model_dir: Path) -> list[str]:
    """A note when `qwen3dbg capture` recorded other weights for this store than the model's: its
    differences from the other sides are then the weights' (other stores record none)."""
    recorded = store.manifest.get("weights_digest")
    here = None if recorded is None else Checkpoint(model_dir).digest()
    if recorded == here:
        return []
    return [f"captured on other weights than {model_dir} (weights digest {recorded}, the model's {here}): "
            "its differences are the weights'; diff it against the model it was captured on"]


def _first_nonfinite(taps: list[TapResult], side: str) -> dict | None:
    """{"step", "tap", "count"} of the first tap where `side` ("cand" or "gold") holds NaN/inf."""
    return next(({"step": r.step, "tap": r.name, "count": r.nonfinite[side]} for r in taps
                 if r.nonfinite.get(side)), None)


def _load(spec: SideSpec, model_dir: Path, dt: torch.dtype):
    from qwen3dbg.registry import load_candidate

    return load_candidate(spec.name, model_dir, dt, **spec.options)


def _divergence(first: TapResult, taps: list[TapResult], cfg: Qwen3Config) -> Divergence:
    div = Divergence(step=first.step, layer=first.layer, tap=first.name, op=first.op, reason=first.reason,
                     excess=first.excess, max_abs=first.max_abs, rel_l2=first.rel_l2, worst=first.worst)
    div.origin = estimate(div, {t.name: t for t in taps if t.step == first.step}, cfg)
    return div


def _diagnose(src: StoreSource, div: Divergence | None) -> list:
    from qwen3dbg.diagnosis import diagnose

    return [] if div is None else list(diagnose(src, div.step, div.tap))


def _in_noise(src: StoreSource, taps: list[TapResult], div: Divergence | None, cfg: Qwen3Config,
              dt: torch.dtype) -> Finding | None:
    """The in-noise difference that most exceeds what its inputs carry (before any divergence): among taps
    differing from the reference by at least IN_NOISE_MIN_ULPS (rms) and by more than their inputs do
    (an input difference below IN_NOISE_CARRIED_ULPS counts as that much), the largest ratio of the two,
    times what magnifies a rounding there (an RMSNorm's largest weight, e.g. k_norm ~96.5: porters need
    that rounding point named, not the first one met)."""
    from qwen3dbg.diagnosis import amplification, explain_rounding

    best, best_rank, best_in, by = None, 0.0, 0.0, {}
    for r in taps:
        if div is not None and (r.step, r.name) == (div.step, div.tap):
            break
        by[(r.step, r.name)] = r
        if r.status != "ok" or r.diff_ulps < IN_NOISE_MIN_ULPS:
            continue
        carried = max((by[(r.step, n)].diff_ulps for n in inputs_of(r.name, cfg) if (r.step, n) in by), default=0.0)
        own = r.diff_ulps / max(carried, IN_NOISE_CARRIED_ULPS)
        if own > 1.0 and (rank := own * amplification(src, r.name)) > best_rank:
            best, best_rank, best_in = r, rank, carried
    if best is None:
        return None

    explained = explain_rounding(src, best.step, best.name)
    if explained is not None:
        return Finding(best.step, best.name, best.diff_ulps, best_in, explained.message, explained.signature,
                       dict(explained.evidence))
    return Finding(best.step, best.name, best.diff_ulps, best_in,
                   f"{best.name} differs from the reference by {best.diff_ulps:.2g} {dtype_name(dt)} ulps (rms) while "
                   f"its inputs differ by {best_in:.2g}: the candidate rounds differently here, within the noise floor",
                   "rounding_point", {"diff_ulps": best.diff_ulps, "input_ulps": best_in})
