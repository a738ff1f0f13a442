"""Diffs at real lengths on the Qwen3-0.6B shape: wall time per phase, peak anonymous memory and bytes
written, each next to the plain runs of its sides measured in the same bench run.

    python bench/bench_long.py [--workdir DIR] [--full] [--only NAME]

Cases (prompt + decode steps, bf16, forced decode ids):
  W          --cand hf:attn=sdpa      2048 + 256   (goals: peak anon <= 6 GB, written <= 2 GB, wall <= 1.5x plain)
  W-module   --cand module:ports/hf_modules.py:load   2048 + 256   HF's own modules behind a mapping, attention
             scores and probabilities mapped (goals: peak anon <= 6 GB, written <= 2 GB)
  W-litgpt   --cand litgpt            2048 + 256   (the same goals; run when litgpt is installed)
  mine       --cand mine              1024 + 64
  store      --cand store:DIR         1024 + 64    (the store written by `qwen3dbg capture --impl mine`)
  scale-N    --cand hf:attn=sdpa      N + 32 for N = 512, 1024, 2048 (peak memory grows linearly)
`--full` runs every case at 2048 + 256; `--tokens 512+32` runs the W cases at another length (their scaling).
Each diff and each plain run is a fresh process, so its peak memory
(RssAnon: mapped weight files aside) and its bytes written (/proc/self/io wchar) are its own; a diff's
"spilled" is the size of the file-backed pages the golden's kept rows went to (golden.Keeper), which
wchar does not see: the bytes a run writes are at most written + spilled. The plain runs
are the sides with capture off: the golden one fp64 forward over every token, hf and mine their real prefill
and decode steps, a store one read of every tap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakAnon, TreeAnon, bytes_written

from qwen3dbg.util.home import home

PRESET = "qwen3-0.6b"
HF_MODULES = f"module:{Path(__file__).resolve().parent / 'ports' / 'hf_modules.py'}:load"


def ids(model: Path, prompt: int, decode: int) -> tuple[list[int], list[int]]:
    from qwen3dbg.model.config import load_config

    vocab = load_config(model).vocab_size
    seq = [(7919 * i + 13) % vocab for i in range(prompt + decode)]
    return seq[:prompt], seq[prompt:]


# ---- what runs in a child process ---------------------------------------------------------------


def child_diff(model: str, cand: str, prompt: int, decode: int) -> dict:
    from qwen3dbg.diff import run_diff

    p, d = ids(Path(model), prompt, decode)
    before = bytes_written()
    phase = ["loading"]  # the comparison's step and layer, or the phase's words

    def compared(step: int, layer: int | None) -> None:
        phase[0] = f"comparing step {step}" + (f" layer {layer}" if layer is not None else "")

    with TreeAnon(0.02, where=lambda: phase[0]) as mem:  # a long run's reference has a process of its own
        t = time.perf_counter()
        result = run_diff(
            "hf",
            cand,
            model_dir=model,
            dtype="bfloat16",
            token_ids=None if cand.startswith("store:") else p,
            decode_ids=None if cand.startswith("store:") else d,
            status=lambda words: phase.__setitem__(0, words),
            progress=compared,
        )
        wall = time.perf_counter() - t
    return {
        "wall": wall,
        "phases": result.timings,
        "peak_anon": mem.peak,
        "peak_at": mem.at,
        "written": bytes_written() - before,
        "spilled": result.spilled,
        "verdict": result.verdict,
        "taps": len(result.taps),
    }


def child_plain(model: str, side: str, prompt: int, decode: int) -> dict:
    """One side with capture off: its own prefill + decode steps (the golden: one forward over all tokens)."""
    import torch

    from qwen3dbg.run.candidate import NullSink
    from qwen3dbg.run.capture import forced_steps

    p, d = ids(Path(model), prompt, decode)
    before = bytes_written()
    with PeakAnon(0.02) as mem:
        t = time.perf_counter()
        if side == "golden":
            from qwen3dbg.diff.golden import LongGolden

            with torch.no_grad():  # its logits are computed on demand: a forward computes them all
                logits = LongGolden(model, one_pass=True).step(
                    torch.tensor([p + d]), torch.tensor([list(range(len(p) + len(d)))]), NullSink()
                )
                for _, block in logits.blocks():
                    block.max()
        elif side.startswith("store:"):
            from qwen3dbg.tapstore.store import TapStore

            store = TapStore.open(side[len("store:") :])
            for info in store.steps:
                for name in store.names(info.step):
                    store.get(info.step, name).max()
        else:
            from qwen3dbg.run.registry import load_candidate
            from qwen3dbg.run.sides import parse_side

            spec = parse_side(side, "cand")
            cand = load_candidate(spec.name, model, "bfloat16", **spec.options)
            t = time.perf_counter()  # loading the weights is not the run
            cand.reset()
            with torch.no_grad():
                for info in forced_steps(p, d):
                    cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), NullSink())
        wall = time.perf_counter() - t
    return {"wall": wall, "peak_anon": mem.peak, "written": bytes_written() - before}


def child_capture(model: str, out: str, prompt: int, decode: int) -> dict:
    from qwen3dbg.run.capture import capture, forced_steps
    from qwen3dbg.run.registry import load_candidate

    p, d = ids(Path(model), prompt, decode)
    t = time.perf_counter()
    capture(load_candidate("mine", model, "bfloat16"), forced_steps(p, d), out)
    return {"wall": time.perf_counter() - t}


def run_child(kind: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the bench ----------------------------------------------------------------------------------

_PLAIN: dict[tuple, dict] = {}


def plain_run(model: Path, side: str, prompt: int, decode: int) -> dict:
    """A side's plain run, measured once per bench run for each length (cases share them)."""
    key = (side, prompt, decode)
    if key not in _PLAIN:
        _PLAIN[key] = run_child("plain", model, side, prompt, decode)
    return _PLAIN[key]


def case(name: str, model: Path, cand: str, plain: list[str], prompt: int, decode: int) -> dict:
    print(
        f"\n{name}: --cand {cand.split('/')[-1] if cand.startswith('store:') else cand}, {prompt} + {decode} tokens",
        flush=True,
    )
    base = {side: plain_run(model, side, prompt, decode) for side in plain}
    for side, r in base.items():
        print(f"  plain {side:18s} {r['wall']:8.1f} s   peak anon {r['peak_anon'] / 1e9:5.2f} GB", flush=True)
    d = run_child("diff", model, cand, prompt, decode)
    plain_sum = sum(r["wall"] for r in base.values())
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in d["phases"].items() if k != "total")
    print(
        f"  diff                     {d['wall']:8.1f} s   peak anon {d['peak_anon'] / 1e9:5.2f} GB   "
        f"written {d['written'] / 1e6:8.1f} MB + spilled {d['spilled'] / 1e6:8.1f} MB   ({phases})"
    )
    print(f"  wall / sum of plain runs {d['wall'] / plain_sum:8.2f}x   verdict: {d['verdict']}", flush=True)
    print(f"  the diff's peak came while {d['peak_at']}", flush=True)
    return {"name": name, "prompt": prompt, "decode": decode, "plain": base, "diff": d, "ratio": d["wall"] / plain_sum}


def synthetic(workdir: Path, preset: str) -> Path:
    """The preset's synthetic checkpoint under the bench's workdir, made on first use."""
    model = workdir / preset
    if not (model / "config.json").exists():
        from qwen3dbg.model.synth import make_model

        make_model(model, preset, replace=True)  # what a run that died left
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=home("bench"))
    p.add_argument("--full", action="store_true", help="every case at 2048 + 256")
    p.add_argument("--only", action="append", help="run only these cases (W, mine, store, scale-512, ...)")
    p.add_argument("--tokens", help="the W cases' prompt + decode steps, e.g. 512+32 (default 2048+256)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *args = a.child
        fn = {"diff": child_diff, "plain": child_plain, "capture": child_capture}[kind]
        print(json.dumps(fn(*args[:2], *map(int, args[2:]))))
        return
    os.environ["QWEN3DBG_HOME"] = str(a.workdir / "home")
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = synthetic(a.workdir, PRESET)
    big = tuple(map(int, a.tokens.split("+"))) if a.tokens else (2048, 256)
    small = big if a.full else (1024, 64)
    store = a.workdir / f"store-mine-{small[0]}-{small[1]}"
    cases = {
        "W": lambda: case("W", model, "hf:attn=sdpa", ["golden", "hf", "hf:attn=sdpa"], *big),
        "W-module": lambda: case("W-module", model, HF_MODULES, ["golden", "hf", HF_MODULES], *big),
        "W-litgpt": lambda: case("W-litgpt", model, "litgpt", ["golden", "hf", "litgpt"], *big),
        "mine": lambda: case("mine", model, "mine", ["golden", "hf", "mine"], *small),
        "store": lambda: case("store", model, f"store:{store}", ["golden", "hf", f"store:{store}"], *small),
        **{
            f"scale-{n}": (
                lambda n=n: case(f"scale-{n}", model, "hf:attn=sdpa", ["golden", "hf", "hf:attn=sdpa"], n, 32)
            )
            for n in (512, 1024, 2048)
        },
    }
    if (not a.only or "store" in a.only) and not (store / "manifest.json").exists():
        print(f"capturing the store: qwen3dbg capture --impl mine, {small[0]} + {small[1]} ...", flush=True)
        run_child("capture", model, store, *small)
    if importlib.util.find_spec("litgpt") is None:
        print("W-litgpt left out: litgpt is not installed (pip install -e '.[litgpt]')", flush=True)
        del cases["W-litgpt"]
    t0 = time.perf_counter()
    rows = [fn() for name, fn in cases.items() if not a.only or name in a.only]
    scale = [r for r in rows if r["name"].startswith("scale-")]
    if len(scale) > 1:
        print("\nscaling (peak anonymous memory of the diff over the largest plain run's):")
        for r in scale:
            own = max(x["peak_anon"] for x in r["plain"].values())
            print(
                f"  {r['prompt']:5d} + 32   diff {r['diff']['peak_anon'] / 1e9:5.2f} GB   largest plain "
                f"{own / 1e9:5.2f} GB   added {(r['diff']['peak_anon'] - own) / 1e9:5.2f} GB   "
                f"written {r['diff']['written'] / 1e6:7.1f} MB"
            )
    print(f"\nbench took {(time.perf_counter() - t0) / 60:.1f} min")
    (a.workdir / "bench_long.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
