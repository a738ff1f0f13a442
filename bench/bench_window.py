"""Issue 27's window port as a new user meets it: the Qwen3-0.6B shape in bf16, 2048 prompt ids drawn by
random.Random(20240607) from 1000..100000, a port that attends over the last 1024 keys in layers 14-27.
Prints the verdict (the row rule's excess and first row, against the whole tensor's), the diagnosis and the
time of each phase.

    python bench/bench_window.py [--workdir DIR] [--tokens 2048] [--window 1024] [--first-layer 14]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "tests" / "diff")]

from test_diff_rows import LateWindow  # noqa: E402

from qwen3dbg.diff import run_diff  # noqa: E402
from qwen3dbg.model.synth import make_model  # noqa: E402
from qwen3dbg.run.registry import IMPLEMENTATIONS  # noqa: E402


class Port(LateWindow):
    """LateWindow with the width and first layer of the command line (set in main)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--first-layer", type=int, default=14)
    args = ap.parse_args()
    Port.window, Port.first_layer = args.window, args.first_layer
    IMPLEMENTATIONS["window-port"] = f"{__name__}:Port"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-window-"))
    model = work / "qwen3-0.6b"
    if not model.exists():
        make_model(model, "qwen3-0.6b", replace=True)
    rng = random.Random(20240607)
    ids = [rng.randrange(1000, 100000) for _ in range(args.tokens)]
    t0 = time.perf_counter()
    result = run_diff(ref="hf", cand="window-port", model_dir=model, dtype="bfloat16", token_ids=ids)
    wall = time.perf_counter() - t0
    print(f"verdict: {result.verdict}")
    d = result.first_divergence
    if d is not None:
        tap = next(t for t in result.taps if (t.step, t.name) == (d.step, d.tap))
        whole = max(tap.rel_l2 / tap.tol_rel, tap.max_abs / tap.tol_abs)
        print(f"whole tensor {whole:.3g}x its tolerance; rows: {tap.extra.get('rows')}")
    for x in result.diagnosis:
        print(f"diagnosis {x.signature}: {x.message}")
        print(f"  evidence: {x.evidence}")
    print(f"wall {wall:.0f} s; phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()), flush=True)


if __name__ == "__main__":
    main()
