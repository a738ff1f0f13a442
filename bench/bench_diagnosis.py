"""Time of one diagnosis on the Qwen3-0.6B shape at 128 tokens (goal: under 10 s), from the window of taps a
streaming diff keeps, for planted bugs the hypotheses explain (the last ones by the grammar of edits, a
composition of two among them) and one none does (every family runs, the grammar's pairs included).

    python bench/bench_diagnosis.py [--workdir DIR] [--tokens 128] [--preset qwen3-0.6b]

Only the window's taps are kept in memory; the golden runs in float64 with its weights streamed per layer.
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
from qwen3dbg.model.checkpoint import Checkpoint  # noqa: E402
from qwen3dbg.model.synth import make_model  # noqa: E402
from qwen3dbg.run.candidate import DictSink  # noqa: E402
from qwen3dbg.run.capture import forced_steps  # noqa: E402

CASES = [
    (MlpNormPreviousLayer, 0, "layers.1.mlp_norm"),
    (AttendsPreviousLayerCache, 1, "layers.1.attn_scores"),
    (PerturbedQProj, 0, "layers.0.q_proj"),
    (SoftmaxTwice, 0, "layers.0.attn_probs"),
    (ShiftedRopeNegatedHalf, 0, "layers.0.q_rope"),
    (OProjNoise, 0, "layers.0.o_proj"),
]


def run_window(cand, steps, window: Window) -> list[dict]:
    """The candidate's taps over `steps`, only those the window holds."""
    cand.reset()
    out = []
    for info in steps:
        sink = DictSink()
        sink.wants = lambda name, s=info.step: window.held(s, name)
        cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        out.append(dict(sink.taps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-diagnosis")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--preset", default="qwen3-0.6b")
    args = ap.parse_args()
    model = args.workdir / args.preset
    if not (model / "config.json").exists():
        make_model(model, args.preset, replace=True)  # what a run that died left
    ids = torch.randint(3, 1000, (args.tokens + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = forced_steps(ids[:-1], ids[-1:])
    torch.set_num_threads(1)
    for cls, step, tap in CASES:
        cfg = Qwen3Reference(model, "bfloat16").config
        window = Window(SimpleNamespace(config=cfg, steps=steps, dtype=torch.bfloat16), step, tap)
        t = time.perf_counter()
        runs = [
            run_window(c, steps, window)
            for c in (
                cls(model, "bfloat16"),
                Qwen3Reference(model, "bfloat16"),
                Qwen3Reference(model, "float64", stream_weights=True),
            )
        ]
        t_runs = time.perf_counter() - t
        src = Sides.__new__(Sides)  # the tests' in-memory TapSource, over the window's runs
        src.config, src.steps, src.dtype, (src._cand, src._ref, src._gold) = cfg, steps, torch.bfloat16, runs
        src._ckpt = Checkpoint(model)
        t = time.perf_counter()
        found = diagnose(Window(src, step, tap), step, tap)
        took = time.perf_counter() - t
        said = found[0].message if found else "nothing explains it"
        print(f"{cls.__name__} at step {step} {tap}: diagnosis {took:.2f} s (runs {t_runs:.0f} s): {said}", flush=True)


if __name__ == "__main__":
    main()
