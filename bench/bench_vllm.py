"""`--cand vllm` on the Qwen3-0.6B shape: each diff next to the plain runs of its sides, and vLLM's decode
tokens/s with capture on, off, and in its compiled (default CPU) mode. Run it with the python of the venv of
.ci/install_vllm.sh:

    python bench/bench_vllm.py [--workdir DIR] [--full] [--only NAME]

Cases (bf16, forced decode ids; goals from issue 24):
  W           --cand vllm              2048 + 256  peak anon <= plain vLLM's + 5 GB, written <= 2 GB,
                                                   wall <= 1.5x the sum of the plain runs
  batch=4     --cand vllm:batch=4      1024 + 64   clean, same memory rule
  chunk=256   --cand vllm:chunk=256    1024 + 64
  prefix=512  --cand vllm:prefix=512   1024 + 64
  tp=2        --cand vllm:tp=2         1024 + 64   clean; peak anon of the process tree (the differ and vLLM's
                                                   workers) <= the plain TP=2 vLLM run's + 5 GB, written <= 2 GB
                                                   (issue 25); wall against the plain runs, TP=2 and in-process
  tp=2-moe    the same on qwen3-30b-a3b-2l (Qwen3-30B-A3B's real layer shapes, 128 experts, 2 layers)
  tokens/s    vLLM decode tokens/s: eager with capture off, eager with every tap captured (goal: at most 2x
              slower), compiled (what vLLM runs by default on CPU, never captured)
Without --full the cases run at 512 + 32 (chunk=128, prefix=256) and W is left out. The plain runs are
bench_long's: the golden's one fp64 forward, hf's and vLLM's own prefill and decode steps with capture off.
The tp=2 case measures every run as a process tree (measure.TreeAnon): its written bytes add what the workers
sent to storage (their socket traffic to the differ is not storage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_long import PRESET, case, child_diff, child_plain, ids, synthetic  # noqa: E402
from measure import TreeAnon  # noqa: E402

from qwen3dbg.util.home import home  # noqa: E402

SIDES = ["golden", "hf", "vllm"]
TP = "vllm:tp=2"
MOE = "qwen3-30b-a3b-2l"


def child_tokens_per_s(model: str, prompt: int, decode: int) -> dict:
    """Decode tokens/s of vLLM on the same forced ids: eager capture off and on (our driver, one step at a
    time), and compiled (vLLM's own generate loop, default CPU compilation, warmed up first: what
    `vllm:speed=on` reports)."""
    import torch

    from qwen3dbg.run.candidate import NullSink
    from qwen3dbg.run.capture import forced_steps
    from qwen3dbg.run.registry import load_candidate

    class Discard:
        def wants(self, name):
            return True

        def __call__(self, name, t):
            pass

    p, d = ids(Path(model), prompt, decode)
    steps = forced_steps(p, d)
    cand = load_candidate("vllm", model, "bfloat16")
    out = {}
    for label, sink in (("eager, capture off", NullSink()), ("eager, capture on", Discard())):
        cand.reset()
        cand.step(torch.tensor(steps[0].token_ids), torch.tensor(steps[0].positions), sink)
        t = time.perf_counter()
        for info in steps[1:]:
            cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        out[label] = decode / (time.perf_counter() - t)
    del cand
    from qwen3dbg.candidates.vllm.speed import decode_tokens_per_s

    out["compiled"] = decode_tokens_per_s(
        Path(model),
        torch.bfloat16,
        p,
        d,
        compiled=True,
        max_model_len=4096,
        kv_cache_bytes=1 << 30,
        threads=torch.get_num_threads(),
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=home("bench"))
    p.add_argument("--full", action="store_true", help="W at 2048 + 256 and the options at 1024 + 64")
    p.add_argument(
        "--only", action="append", help="run only these cases (W, batch=4, chunk, prefix, tp=2, tp=2-moe, tokens/s)"
    )
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--child-tree", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_tree:
        kind, model_dir, side, prompt, decode = a.child_tree
        print(json.dumps(child_tree(kind, model_dir, side, int(prompt), int(decode))))
        return
    if a.child:
        print(json.dumps(child_tokens_per_s(a.child[0], *map(int, a.child[1:]))))
        return
    os.environ["QWEN3DBG_HOME"] = str(a.workdir / "home")
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = synthetic(a.workdir, PRESET)
    n, k = (1024, 64) if a.full else (512, 32)
    cases = {
        "batch=4": lambda: case("batch=4", model, "vllm:batch=4", SIDES, n, k),
        "chunk": lambda: case(f"chunk={n // 4}", model, f"vllm:chunk={n // 4}", SIDES, n, k),
        "prefix": lambda: case(f"prefix={n // 2}", model, f"vllm:prefix={n // 2}", SIDES, n, k),
        "tp=2": lambda: tp_case("tp=2", model, n, k),
        "tp=2-moe": lambda: tp_case("tp=2-moe", synthetic(a.workdir, MOE), n, k),
        "tokens/s": lambda: tokens_per_s(model, n, k),
    }
    if a.full:
        cases = {"W": lambda: case("W", model, "vllm", SIDES, 2048, 256), **cases}
    t0 = time.perf_counter()
    rows = [fn() for name, fn in cases.items() if not a.only or name in a.only]
    for r in rows:
        if "diff" in r:
            plain = TP if r["name"].startswith("tp=2") else "vllm"
            grew = r["diff"]["peak_anon"] - r["plain"][plain]["peak_anon"]
            print(f"{r['name']}: peak anon {grew / 1e9:+.2f} GB over plain {plain}'s (goal <= +5 GB)")
    print(f"\nbench took {(time.perf_counter() - t0) / 60:.1f} min")
    (a.workdir / "bench_vllm.json").write_text(json.dumps(rows, indent=1))


def child_tree(kind: str, model: str, side: str, prompt: int, decode: int) -> dict:
    """bench_long's diff or plain run, measured as a process tree."""
    with TreeAnon() as tree:
        r = (child_diff if kind == "diff" else child_plain)(model, side, prompt, decode)
    return dict(r, peak_anon=tree.peak, written=r["written"] + tree.children_written)


def tp_case(name: str, model: Path, prompt: int, decode: int) -> dict:
    print(
        f"\n{name}: --cand {TP} on {model.name}, {prompt} + {decode} tokens (peak anon of each process tree)",
        flush=True,
    )
    plain = {side: _tree_here("plain", model, side, prompt, decode) for side in [*SIDES, TP]}
    for side, r in plain.items():
        print(f"  plain {side:18s} {r['wall']:8.1f} s   peak anon {r['peak_anon'] / 1e9:5.2f} GB", flush=True)
    d = _tree_here("diff", model, TP, prompt, decode)
    own = plain[TP]["peak_anon"]
    print(
        f"  diff                     {d['wall']:8.1f} s   peak anon {d['peak_anon'] / 1e9:5.2f} GB   "
        f"written {d['written'] / 1e6:8.1f} MB   verdict: {d['verdict']}"
    )
    print(f"  peak anon {(d['peak_anon'] - own) / 1e9:+.2f} GB over plain TP=2 vLLM's (goal <= +5 GB)")
    print(f"  written {d['written'] / 1e9:.3f} GB (goal <= 2 GB)")
    for vllm in ("vllm", TP):
        total = sum(plain[s]["wall"] for s in ("golden", "hf", vllm))
        print(f"  wall / sum of plain runs (golden, hf, {vllm}) {d['wall'] / total:6.2f}x")
    return {"name": name, "prompt": prompt, "decode": decode, "plain": plain, "diff": d}


def _tree_here(kind: str, model: Path, side: str, prompt: int, decode: int) -> dict:
    import subprocess

    args = [sys.executable, __file__, "--child-tree", kind, str(model), side, str(prompt), str(decode)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokens_per_s(model: Path, prompt: int, decode: int) -> dict:
    print(f"\ntokens/s: vLLM decoding {decode} forced ids after {prompt} prompt tokens", flush=True)
    r = _child_here(model, prompt, decode)
    for label, v in r.items():
        rate = "within timing noise" if v is None else f"{v:8.2f} tokens/s"  # decode_tokens_per_s says None then
        print(f"  {label:20s} {rate}", flush=True)
    print(f"  capture on / off      {r['eager, capture off'] / r['eager, capture on']:8.2f}x slower (goal <= 2x)")
    return {"name": "tokens/s", **r}


def _child_here(model: Path, prompt: int, decode: int) -> dict:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(prompt), str(decode)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"tokens/s failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
