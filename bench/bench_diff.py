"""Benchmark of the differ's comparison against merely reading its stores (goal: within 2x, memory of a
few taps), on the Qwen3-0.6B shape: 28 layers, 128 tokens, every tap; and, separately, the reference runs.

    python bench/bench_diff.py [--workdir DIR] [--tokens 128] [--preset qwen3-0.6b]

The model and the three stores (fp64 golden, hf and a candidate in bf16) are made once under --workdir
and reused; reading and comparing are timed on a warm page cache, each in a fresh process so that its
peak memory is its own. Peak memory is the process's anonymous resident memory (not the mapped files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakAnon

from qwen3dbg.util.home import home


def stores(work: Path, preset: str, tokens: int):
    """Make the model and the three stores if absent; return (model_dir, gold, ref, cand, reference-run seconds)."""
    os.environ["QWEN3DBG_HOME"] = str(work / "home")
    from qwen3dbg.model.config import load_config
    from qwen3dbg.model.synth import make_model
    from qwen3dbg.run.capture import capture, forced_steps
    from qwen3dbg.run.registry import load_candidate

    model = work / preset
    if not (model / "config.json").exists():
        t = time.perf_counter()
        make_model(model, preset, replace=True)  # what a run that died left
        print(f"made {preset} in {time.perf_counter() - t:.1f} s", flush=True)
    vocab = load_config(model).vocab_size
    steps = forced_steps([(17 * i + 5) % vocab for i in range(tokens)], [])
    runs = {}
    for name, dtype in (("scratch", "float64"), ("hf", "bfloat16"), ("rmsnorm-fused", "bfloat16")):
        path = work / f"store-{name}-{dtype}-{tokens}"
        cached = (path / "manifest.json").exists()
        t = time.perf_counter()
        if not cached:
            capture(load_candidate(name, model, dtype), steps, path)
        runs[f"{name} {dtype}"] = (time.perf_counter() - t, cached, path)
    # A cached run reports the time it took when it was made.
    record = work / f"run-seconds-{tokens}.json"
    made = json.loads(record.read_text()) if record.exists() else {}
    made.update({name: sec for name, (sec, cached, _) in runs.items() if not cached})
    record.write_text(json.dumps(made))
    return model, {name: (made.get(name, sec), cached, path) for name, (sec, cached, path) in runs.items()}


def child(mode: str, threads: str, model: str, gold: str, ref: str, cand: str) -> None:
    """One measurement in this fresh process: 'read' every tap of the three stores, or 'compare' them."""
    import torch

    from qwen3dbg.diff.compare import Comparison
    from qwen3dbg.diff.streams import Schedule, StoreSide
    from qwen3dbg.model.config import load_config
    from qwen3dbg.tapstore.store import TapStore

    torch.set_num_threads(int(threads))
    sides = [TapStore.open(p) for p in (gold, ref, cand)]
    schedule = Schedule(sides[0].steps, len(sides[0].steps))
    with PeakAnon() as mem:
        start = time.perf_counter()
        if mode == "read":  # one pass over every byte (the stores are memory-mapped: `get` alone reads nothing)
            n = 0
            for st in sides:
                for info in st.steps:
                    for name in st.names(info.step):
                        tap = st.get(info.step, name)
                        tap.max()
                        n += tap.numel()
        else:
            streams = [StoreSide(role, st) for role, st in zip(("gold", "ref", "cand"), sides)]
            n = sum(1 for _ in Comparison(*streams, schedule, load_config(model), sides[1].dtype).run())
        dt = time.perf_counter() - start
    print(json.dumps({"seconds": dt, "peak_anon": mem.peak - mem.base, "count": n}))


def measure(mode: str, threads: int, model: Path, runs: dict) -> dict:
    paths = [str(runs[k][2]) for k in ("scratch float64", "hf bfloat16", "rmsnorm-fused bfloat16")]
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(threads), str(model), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=home("bench"))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both measurements (1: a shared machine's oversubscribed OpenMP distorts timings)",
    )
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs of each measurement")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    a.workdir.mkdir(parents=True, exist_ok=True)
    model, runs = stores(a.workdir, a.preset, a.tokens)
    print(f"\nreference runs ({a.preset}, {a.tokens} tokens, every tap):")
    for name, (sec, cached, path) in runs.items():
        size = sum(f.stat().st_size for f in Path(path).iterdir()) / 1e9
        print(f"  {name:24s} {sec:7.1f} s{' (made earlier, cached)' if cached else ''}   store {size:.2f} GB")
    measure("read", a.threads, model, runs)  # warm the page cache for both measurements
    # Best of N, read and compare alternating: a shared machine's load comes and goes.
    reads, comps = [], []
    for _ in range(a.repeat):
        reads.append(measure("read", a.threads, model, runs))
        comps.append(measure("compare", a.threads, model, runs))
    read, comp = min(reads, key=lambda r: r["seconds"]), min(comps, key=lambda r: r["seconds"])
    from qwen3dbg.tapstore.store import TapStore

    gold = TapStore.open(runs["scratch float64"][2])
    largest = max(gold.get(0, n).numel() for n in gold.names(0)) * 8
    print(f"\nread the three stores (one pass over every tap), {a.threads} torch thread(s), best of {a.repeat}:")
    print(f"                         {read['seconds']:7.2f} s   peak anon memory {read['peak_anon'] / 1e6:8.1f} MB")
    print(
        f"compare (all {comp['count']} taps): {comp['seconds']:7.2f} s   "
        f"peak anon memory {comp['peak_anon'] / 1e6:8.1f} MB"
    )
    print(f"ratio compare / read:    {comp['seconds'] / read['seconds']:7.2f}x   (goal: within 2x)")
    print(
        f"largest tap in float64:  {largest / 1e6:7.1f} MB  "
        f"-> compare peak = {comp['peak_anon'] / largest:.1f} such taps"
    )


if __name__ == "__main__":
    main()
