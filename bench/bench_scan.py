"""scan-checkpoint vs simply reading the same bytes, warm page cache, side by side (issue 5's goal: <= 1.5x).

Generates once (cached) a multi-shard bf16 checkpoint of the Qwen3-0.6B shape with more layers (>= 4 GB),
reads it once to warm the page cache, then in child processes (so peak RSS is each one's own):
`read` (readinto a 64 MiB buffer, like cat > /dev/null), `scan` (the whole scan-checkpoint), and for
context `torch` (separate torch reductions on the largest tensor, the approach the kernel replaces).

    python bench/bench_scan.py [--layers 124] [--shard-mb 1024] [--repeat 2] [--dir /tmp/qwen3dbg-bench-scan]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUF = 64 * 1024**2


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process; unlike ru_maxrss, not inherited
    from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_all(files: list[Path]) -> int:
    buf, n = bytearray(BUF), 0
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                n += k
    return n


def child(mode: str, model: Path, repeat: int) -> dict:
    files = sorted(model.glob("*.safetensors"))
    if mode == "read":
        base = _rss_mb("VmRSS")
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = read_all(files)
            best = min(best, time.perf_counter() - t0)
        return {"seconds": best, "bytes": n, "rss_base_mb": base, "rss_peak_mb": _rss_mb()}
    if mode == "scan":
        from qwen3dbg.scan.scan import scan_checkpoint
        from qwen3dbg.scan.stats import chunk_elements

        chunk_elements()  # build or load the kernel outside the timing
        base = _rss_mb("VmRSS")
        best, result = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = scan_checkpoint(model)
            best = min(best, time.perf_counter() - t0)
        return {
            "seconds": best,
            "bytes": result.bytes_read,
            "rss_base_mb": base,
            "rss_peak_mb": _rss_mb(),
            "counts": result.counts(),
        }
    import torch

    from qwen3dbg.model.checkpoint import Checkpoint

    t = Checkpoint(model).get("model.embed_tokens.weight")
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    torch.isfinite(t).all(), t.min(), t.max(), t.float().mean(), t.float().std(), t.abs().max(), (t == 0).sum()
    return {
        "seconds": time.perf_counter() - t0,
        "bytes": t.numel() * t.element_size(),
        "rss_base_mb": base,
        "rss_peak_mb": _rss_mb(),
    }


def ensure_model(root: Path, layers: int, shard_mb: int) -> Path:
    from qwen3dbg.model.synth import make_model

    model = root / f"qwen3-0.6b-{layers}l-bf16"
    done = model / ".complete"
    if not done.exists():
        print(f"generating {model} (once) ...", flush=True)
        make_model(
            model,
            "qwen3-0.6b",
            overrides={"num_hidden_layers": layers},
            shard_bytes=shard_mb * 1024**2,
            replace=True,
        )
        done.touch()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=124, help="124 layers of the 0.6B shape: about 4.2 GB in bf16")
    ap.add_argument("--shard-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3dbg-bench-scan")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.repeat)))
        return
    model = ensure_model(args.dir, args.layers, args.shard_mb)
    files = sorted(model.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    print(f"checkpoint: {model} ({len(files)} shards, {total / 1e9:.2f} GB); warming the page cache ...", flush=True)
    read_all(files)
    runs = {}
    for mode in ("read", "scan", "torch"):
        out = subprocess.run(
            [sys.executable, __file__, "--repeat", str(args.repeat), "--child", mode, str(model)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{'mode':<7}{'seconds':>9}{'GB':>8}{'GB/s':>8}{'base RSS MB':>13}{'peak RSS MB':>13}")
    for mode, r in runs.items():
        print(
            f"{mode:<7}{r['seconds']:>9.2f}{r['bytes'] / 1e9:>8.2f}{r['bytes'] / 1e9 / r['seconds']:>8.2f}"
            f"{r['rss_base_mb']:>13.0f}{r['rss_peak_mb']:>13.0f}"
        )
    ratio = runs["scan"]["seconds"] / runs["read"]["seconds"]
    print(f"scan / read time: {ratio:.2f}x (goal <= 1.5x); scan findings: {runs['scan']['counts']}")
    torch_rate = runs["torch"]["bytes"] / runs["torch"]["seconds"]
    scan_rate = runs["scan"]["bytes"] / runs["scan"]["seconds"]
    print(
        f"separate torch reductions on the largest tensor: {torch_rate / 1e9:.2f} GB/s, "
        f"{scan_rate / torch_rate:.1f}x slower than the scan"
    )


if __name__ == "__main__":
    main()
