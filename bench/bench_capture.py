"""Capture of every tap vs the plain HF forward, side by side in one run (issue 3's goal: <= 1.5x time).

Each mode runs in its own process so its peak RSS is its own. Default: the Qwen3-0.6B shape, 128
prompt tokens + 8 decode steps, bf16, eager attention (the path that exposes attention probabilities).

    python bench/bench_capture.py [--preset qwen3-0.6b] [--tokens 128] [--decode 8] [--attn eager]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(mode: str, model: Path, tokens: int, decode: int, dtype: str, attn: str, repeat: int) -> dict:
    import torch
    from qwen3dbg.reference.hf import HFCandidate

    from qwen3dbg.model.config import load_config
    from qwen3dbg.run.capture import capture, forced_steps

    torch.manual_seed(0)
    prompt = torch.randint(0, load_config(model).vocab_size, (tokens,)).tolist()
    steps = forced_steps(prompt, list(range(100, 100 + decode)))
    cand = HFCandidate(model, dtype, attn=attn)
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            if mode == "plain":
                cand.reset()
                with torch.no_grad():
                    for info in steps:
                        cand.model(
                            input_ids=torch.tensor(info.token_ids),
                            position_ids=torch.tensor(info.positions),
                            past_key_values=cand.cache,
                            use_cache=True,
                        )
            else:
                capture(cand, steps, out)
            best = min(best, time.perf_counter() - t0)
            written = sum(f.stat().st_size for f in Path(out).iterdir())
    return {
        "mode": mode,
        "seconds": best,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "written_mb": written / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model, a.tokens, a.decode, a.dtype, a.attn, a.repeat)))
        return

    from qwen3dbg.model.synth import default_model_dir

    model = default_model_dir(a.preset)
    results = {}
    for mode in ("plain", "capture"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--model",
            str(model),
            "--tokens",
            str(a.tokens),
            "--decode",
            str(a.decode),
            "--dtype",
            a.dtype,
            "--attn",
            a.attn,
            "--repeat",
            str(a.repeat),
        ]
        results[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    p, c = results["plain"], results["capture"]
    print(
        f"{a.preset}, {a.tokens} prompt tokens + {a.decode} decode steps, {a.dtype}, attn={a.attn}, best of {a.repeat}"
    )
    print(f"{'':22s}{'seconds':>10s}{'peak RSS GB':>14s}{'written MB':>12s}")
    print(f"{'plain HF forward':22s}{p['seconds']:10.3f}{p['peak_rss_gb']:14.2f}{'':>12s}")
    print(f"{'capture, all taps':22s}{c['seconds']:10.3f}{c['peak_rss_gb']:14.2f}{c['written_mb']:12.1f}")
    print(
        f"capture / plain: {c['seconds'] / p['seconds']:.2f}x time (goal <= 1.5x), "
        f"{c['peak_rss_gb'] / p['peak_rss_gb']:.2f}x peak memory"
    )


if __name__ == "__main__":
    main()
