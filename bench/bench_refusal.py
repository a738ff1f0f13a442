"""How long a refusal takes to appear: `qwen3dbg diff` and `capture` given bad arguments, cold (bytecode not yet
compiled, as on a fresh install) and warm, beside `qwen3dbg --help` and beside importing torch, the cost a refusal
checked from its text avoids.

    python bench/bench_refusal.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "unknown --cand": ["diff", "--cand", "rope-theta-1e5"],
    "missing --model": ["diff", "--cand", "hf", "--model", "/nonexistent/model"],
    "bad --token-ids": ["diff", "--cand", "hf", "--token-ids", "1,x"],
    "capture, bad --impl": ["capture", "--impl", "scrach", "--out", "/nonexistent/out"],
}
ENTRY = "import sys; from qwen3dbg.cli import main; sys.argv = ['qwen3dbg', *sys.argv[1:]]; main()"


def timed(argv: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="warm runs per case (the median is printed)")
    args = ap.parse_args()
    rows = {"--help": ["--help"], **CASES}
    print(f"{'case':22} {'cold s':>7} {'warm s':>7} {'warm / --help':>14}")
    warm_help = None
    for label, argv in rows.items():
        with tempfile.TemporaryDirectory() as pycache:  # cold: every module compiled anew
            cold = timed([sys.executable, "-c", ENTRY, *argv], {**os.environ, "PYTHONPYCACHEPREFIX": pycache})
        warm = statistics.median(
            timed([sys.executable, "-c", ENTRY, *argv], dict(os.environ)) for _ in range(args.repeat)
        )
        warm_help = warm_help or warm
        print(f"{label:22} {cold:7.2f} {warm:7.2f} {warm / warm_help:13.2f}x")
    torch = statistics.median(
        timed([sys.executable, "-c", "import torch"], dict(os.environ)) for _ in range(args.repeat)
    )
    print(f"{'(import torch alone)':22} {'':7} {torch:7.2f} {torch / warm_help:13.2f}x")


if __name__ == "__main__":
    main()
