"""mine's speed next to HF's on the same device, measured side by side in one run, on the Qwen3-0.6B
shape (made once into the qwen3dbg cache): prefill and decode tokens/s, and capture on vs off.

    python bench/bench_mine.py                   # the CPU twin vs HF on this CPU
    python bench/bench_mine.py --device cuda --profile   # the CUDA path (with and without programmatic
                                                         # dependent launch), plus its kernels' times
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from qwen3dbg.candidates.mine.engine import MineCandidate
from qwen3dbg.candidates.mine.selftest import capture_stepper, hf_stepper, plain_stepper, probe_ids, time_steps
from qwen3dbg.reference.hf import HFCandidate

from qwen3dbg.model.synth import default_model_dir
from qwen3dbg.run.candidate import NullSink


def profile_decode(engine: MineCandidate, steps: int) -> str:
    """Per-kernel CUDA time of `steps` decode steps, without the graph so each kernel shows, and without
    overlapping launches, whose waits for the kernel before would count as each kernel's own time."""
    from torch.profiler import ProfilerActivity, profile

    pdl, engine.use_graph, engine.use_pdl = engine.use_pdl, False, False
    engine.reset()
    engine.step(torch.tensor([[1] * 16]), torch.arange(16)[None], NullSink())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            engine.step(torch.tensor([[5]]), torch.tensor([[16 + i]]), NullSink())
        torch.cuda.synchronize()
    engine.use_graph, engine.use_pdl = True, pdl
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default=None, help="model directory (default: the qwen3-0.6b preset, made once)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="cuda: print the kernels' share of a decode step")
    args = ap.parse_args()
    model = args.model or default_model_dir("qwen3-0.6b")
    dev = torch.device(args.device)
    engine = MineCandidate(model, "bfloat16", device=args.device)
    prompt = probe_ids(engine.config.vocab_size, args.prompt_tokens)
    rows = {"mine": time_steps(*plain_stepper(engine), dev, prompt, args.decode_steps)}
    with tempfile.TemporaryDirectory(prefix="qwen3dbg-bench-") as tmp:  # every tap, into a tap store
        rows["mine, capture on"] = time_steps(*capture_stepper(engine, Path(tmp)), dev, prompt, args.decode_steps)
    if args.profile and dev.type == "cuda":
        print(profile_decode(engine, args.decode_steps))
    del engine
    if dev.type == "cuda":  # each kernel waits for the one before to end: what overlapping launches save
        serial = MineCandidate(model, "bfloat16", device="cuda", pdl=False)
        rows["mine, pdl=false"] = time_steps(*plain_stepper(serial), dev, prompt, args.decode_steps)
        del serial
    for attn in ("eager", "sdpa"):
        hf = HFCandidate(model, "bfloat16", attn=attn)
        hf.model.to(dev)
        rows[f"hf {attn}"] = time_steps(*hf_stepper(hf), dev, prompt, args.decode_steps)
        del hf
    print(
        f"{Path(model).name}, bf16, {dev.type}: prefill {args.prompt_tokens} tokens, {args.decode_steps} decode steps"
    )
    print(
        f"{'':18s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s}"
        "  (x: mine / this row)"
    )
    mine_pre, mine_dec = rows["mine"]
    for label, (pre, dec) in rows.items():
        print(f"{label:18s} {pre:14.1f} {dec:13.2f} {mine_pre / pre:10.2f} {mine_dec / dec:9.2f}")
    on_pre, on_dec = rows["mine, capture on"]
    print(f"capture on costs {mine_pre / on_pre:.2f}x in prefill and {mine_dec / on_dec:.2f}x in decode")


if __name__ == "__main__":
    main()
