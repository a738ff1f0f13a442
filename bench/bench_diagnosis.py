"""Time of one diagnosis on the Qwen3-0.6B shape at 128 tokens (goal: under 10 s), from the window of taps a
streaming diff keeps, for planted bugs the hypotheses explain (the last ones by the grammar of edits, a
composition of two among them) and one none does (every family runs, the grammar's pairs included).

    python bench/bench_diagnosis.py [--workdir DIR] [--tokens 128] [--preset qwen3-0.6b]
    python bench/bench_diagnosis.py --tokens 2048 --decode 256    # the long-run workload (goal: under 30 s)

With `--decode N` the cases are those of a long run: three bugs in the prefill of `--tokens` rows (one the
grammar's, on the attention probabilities, the largest taps; one nothing explains) and one that first fires at
the last decode step, where the cache holds the whole prompt and N decode tokens. Only the window's taps are kept
in memory; the golden runs in float64 with its weights streamed per layer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "tests" / "diff")]

from qwen3dbg.reference.qwen3 import Qwen3Reference  # noqa: E402
from test_diagnosis import PerturbedQProj, Sides  # noqa: E402
from test_diagnosis_grammar import OProjNoise, ShiftedRopeNegatedHalf, SoftmaxTwice  # noqa: E402
from test_diagnosis_hypotheses import AttendsPreviousLayerCache, MlpNormPreviousLayer, Window  # noqa: E402

from qwen3dbg.diff.diagnosis import diagnose  # noqa: E402
from qwen3dbg.diff.diagnosis.site import Site  # noqa: E402
from qwen3dbg.model.checkpoint import Checkpoint  # noqa: E402
from qwen3dbg.model.synth import make_model  # noqa: E402
from qwen3dbg.run.candidate import DictSink  # noqa: E402
from qwen3dbg.run.capture import forced_steps  # noqa: E402
from qwen3dbg.tapstore.schema import parse_tap_name  # noqa: E402

SHORT = [
    (MlpNormPreviousLayer, 0, "layers.1.mlp_norm"),
    (AttendsPreviousLayerCache, 1, "layers.1.attn_scores"),
    (PerturbedQProj, 0, "layers.0.q_proj"),
    (SoftmaxTwice, 0, "layers.0.attn_probs"),
    (ShiftedRopeNegatedHalf, 0, "layers.0.q_rope"),
    (OProjNoise, 0, "layers.0.o_proj"),
]


class LastStepCache(AttendsPreviousLayerCache):
    """AttendsPreviousLayerCache from the step whose cache holds `fire_at` positions on (set per run)."""

    fire_at = 0

    def update_cache(self, layer, k, v):
        k, v = super().update_cache(layer, k, v)
        if k.shape[2] < self.fire_at:
            self.other = None
        return k, v


def long_cases(decode: int) -> list:
    """The long-run workload's cases: three in the prefill (one that nothing explains: every family and the
    grammar's pairs run), one at the last decode step."""
    return [
        (MlpNormPreviousLayer, 0, "layers.1.mlp_norm"),
        (SoftmaxTwice, 0, "layers.0.attn_probs"),
        (OProjNoise, 0, "layers.0.o_proj"),
        (LastStepCache, decode, "layers.1.attn_scores"),
    ]


def run_window(cand, steps, windows: list[Window]) -> list[dict]:
    """The candidate's taps over `steps`, only those one of the windows holds."""
    cand.reset()
    out = []
    for info in steps[: max(w.at for w in windows) + 1]:  # nothing after the divergence is held
        sink = DictSink()
        sink.wants = lambda name, s=info.step: any(w.held(s, name) for w in windows)
        cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        out.append(dict(sink.taps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-diagnosis")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length")
    ap.add_argument("--decode", type=int, default=0, help="decode steps: the long-run cases")
    ap.add_argument("--preset", default="qwen3-0.6b")
    args = ap.parse_args()
    model = args.workdir / args.preset
    if not (model / "config.json").exists():
        make_model(model, args.preset, replace=True)  # what a run that died left
    cfg = Qwen3Reference(model, "bfloat16").config
    n = args.tokens + max(args.decode, 1)
    ids = torch.randint(3, min(1000, cfg.vocab_size), (n,), generator=torch.Generator().manual_seed(0))
    steps = forced_steps(ids[: args.tokens].tolist(), ids[args.tokens :].tolist())
    LastStepCache.fire_at = n
    torch.set_num_threads(1)
    print(f"{args.preset}, {args.tokens} prompt + {args.decode} decode tokens, one torch thread", flush=True)
    cases = long_cases(args.decode) if args.decode else SHORT
    shape = SimpleNamespace(config=cfg, steps=steps, dtype=torch.bfloat16)
    windows = [Window(shape, step, tap) for _, step, tap in cases]
    t = time.perf_counter()  # the reference and the golden run once, for every case's window
    ref, gold = (
        run_window(c, steps, windows)
        for c in (Qwen3Reference(model, "bfloat16"), Qwen3Reference(model, "float64", stream_weights=True))
    )
    print(f"reference and golden runs {time.perf_counter() - t:.0f} s", flush=True)
    for (cls, step, tap), window in zip(cases, windows):
        t = time.perf_counter()
        cand = run_window(cls(model, "bfloat16"), steps, [window])
        t_run = time.perf_counter() - t
        src = Sides.__new__(Sides)  # the tests' in-memory TapSource, over the window's runs
        src.config, src.steps, src.dtype, (src._cand, src._ref, src._gold) = (
            cfg,
            steps,
            torch.bfloat16,
            (cand, ref, gold),
        )
        src._ckpt = Checkpoint(model)
        t = time.perf_counter()
        found = diagnose(Window(src, step, tap), step, tap)
        took = time.perf_counter() - t
        said = found[0].message if found else "nothing explains it"
        if not found and not Site(Window(src, step, tap), step, *parse_tap_name(tap)).divergent():
            said = "within the differ's tap rule there (not divergent): nothing to explain"
        print(f"{cls.__name__} at step {step} {tap}: diagnosis {took:.2f} s (run {t_run:.0f} s): {said}", flush=True)


if __name__ == "__main__":
    main()
