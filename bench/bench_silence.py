"""The longest silence of README's long run as a log sees it: `qwen3dbg diff` at 2048 + 256 on the Qwen3-0.6B shape,
its stderr piped (no terminal: plain lines), each line timestamped; prints the longest gap between two lines (goal:
at most 10 s) and the lines around it, from the start of the process to its exit.

    python bench/bench_silence.py [--workdir DIR] [--tokens 2048+256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from qwen3dbg.util.home import home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=home("bench"), help="where the 0.6B-shape model is made once")
    ap.add_argument("--tokens", default="2048+256", help="prompt + forced decode steps, e.g. 512+32")
    ap.add_argument("--preset", default="qwen3-0.6b")
    args = ap.parse_args()
    prompt, decode = (int(n) for n in args.tokens.split("+"))
    model = args.workdir / f"{args.preset}-silence"
    if not (model / "config.json").exists():
        from qwen3dbg.model.synth import make_model

        make_model(model, args.preset, replace=True)
    from qwen3dbg.model.config import load_config

    vocab = load_config(model).vocab_size
    argv = [
        *(sys.executable, "-c", "from qwen3dbg.cli import main; main()"),
        *("diff", "--cand", "hf:attn=sdpa", "--model", str(model)),
        *("--token-ids", ",".join(str(i % vocab) for i in range(1, prompt + 1))),  # README's ids
        *("--decode-ids", ",".join(str((3000 + i) % vocab) for i in range(decode))),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
    stamps: list[tuple[float, str]] = [(0.0, "(process started)")]
    for line in proc.stderr:
        stamps.append((time.perf_counter() - t0, line.rstrip()))
    proc.wait()
    stamps.append((time.perf_counter() - t0, f"(process exited {proc.returncode})"))
    gaps = [(b[0] - a[0], i) for i, (a, b) in enumerate(zip(stamps, stamps[1:]))]
    gap, i = max(gaps)
    print(
        f"{args.preset}, {prompt} + {decode}: {len(stamps) - 2} lines in {stamps[-1][0]:.0f} s, exit {proc.returncode}"
    )
    print(f"longest silence {gap:.1f} s (goal <= 10 s), between:")
    for t, line in stamps[max(0, i - 1) : i + 3]:
        print(f"  {t:8.1f} s  {line[:140]}")


if __name__ == "__main__":
    main()
