"""False alarms of the diagnosis on clean pairs, over seeds: the systematic-deviation detector (its own
margin: the largest z over its threshold, and findings) and the hypothesis engine on each pair's worst taps.

    python bench/bench_systematic.py [--seeds 20] [--tokens 48] [--workdir DIR]

Each seed makes its own tiny model (weights drawn from the seed) and its own token ids. Findings must be 0
for every pair; the detector is designed for a per-run false-alarm rate under 1e-3.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from qwen3dbg.diff import run_diff
from qwen3dbg.diff.diagnosis import diagnose
from qwen3dbg.diff.diagnosis.systematic import MARGIN, MIN_ROWS, inflation, threshold
from qwen3dbg.diff.metrics import rel
from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.synth import Plants, make_model
from qwen3dbg.run.capture import forced_steps, run_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.run.sides import parse_side
from qwen3dbg.util.dtypes import parse_dtype

#: (ref, cand, preset, plants, dtype): the clean pairs of issue 14 that run on a CPU
PAIRS = [
    ("hf", "hf:attn=sdpa", "tiny-dense", {}, "bfloat16"),
    ("hf", "hf:attn=sdpa", "tiny-moe", {}, "float16"),
    ("hf", "rmsnorm-fused", "tiny-dense", {"q_norm_peak": 40.0, "k_norm_peak": 96.5}, "bfloat16"),
    ("hf", "scratch", "tiny-dense", {}, "float32"),
    ("hf", "scratch", "tiny-moe", {}, "bfloat16"),
    ("scratch", "hf", "tiny-moe", {}, "float16"),
    ("hf", "mine", "tiny-dense", {}, "bfloat16"),
    ("hf", "module:qwen3dbg.candidates.ports.standalone_qwen3:load", "tiny-dense", {}, "bfloat16"),
]


class Memory:
    """A TapSource over in-memory runs of three candidates."""

    def __init__(self, model_dir, dtype, ref, cand, steps):
        self.dtype, self.steps = parse_dtype(dtype), steps
        runs = [run_steps(c, steps) for c in (ref, cand, load_candidate("scratch", model_dir, "float64"))]
        self._ref, self._cand, self._gold = runs
        self.config, self._ckpt = cand.config, Checkpoint(model_dir)

    def ref(self, step, name):
        return self._ref[step].get(name)

    def cand(self, step, name):
        return self._cand[step].get(name)

    def gold(self, step, name):
        return self._gold[step].get(name)

    def weight(self, name):
        return self._ckpt.get(name) if name in self._ckpt else None


def worst_taps(src: Memory, k: int = 3) -> list[tuple[int, str]]:
    """(step, name) of the k taps where the candidate is furthest from fp64 relative to the reference."""
    scored = []
    for step, taps in enumerate(src._cand):
        for name, c in taps.items():
            r, g = src.ref(step, name), src.gold(step, name)
            if r is None or not c.is_floating_point() or c.shape != g.shape:
                continue
            scored.append((rel(c, g) / max(rel(r, g), torch.finfo(src.dtype).eps), step, name))
    return [(s, n) for _, s, n in sorted(scored, reverse=True)[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-systematic-"))
    for ref, cand, preset, plants, dtype in PAIRS:
        t0, margins, findings, stated = time.perf_counter(), [], 0, []
        for seed in range(args.seeds):
            model = work / f"{preset}-{'-'.join(f'{k}{v}' for k, v in plants.items())}-{seed}"
            if not model.exists():
                make_model(model, preset, seed=seed, plants=Plants(**plants), replace=True)
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, 500, (args.tokens,), generator=gen).tolist()
            try:
                result = run_diff(ref=ref, cand=cand, model_dir=model, dtype=dtype, token_ids=ids, decode_ids=ids[:2])
            except Exception as e:  # noqa: BLE001 - a pair this machine cannot run (mine without its build)
                print(f"{ref} vs {cand} ({preset}, {dtype}): skipped, {type(e).__name__}: {e}")
                break
            tested = [
                t for t in result.taps if t.status == "ok" and t.extra.get("signed", {}).get("rows", 0) >= MIN_ROWS
            ]
            lam = {
                k: max(inflation([t.extra["signed"][f"z_{s}{k}"] for t in tested]) for s in ("", "ref_"))
                for k in ("shift", "scale")
            }
            crit = MARGIN * threshold(2 * len(tested))
            margins.append(
                max(
                    abs(t.extra["signed"][f"z_{k}"]) / math.sqrt(lam[k]) / crit
                    for t in tested
                    for k in ("shift", "scale")
                )
            )
            findings += result.systematic is not None
            src = Memory(model, dtype, _load(ref, model, dtype), _load(cand, model, dtype), forced_steps(ids, ids[:2]))
            stated += [f"{n}: {d.signature}" for s, n in worst_taps(src) for d in diagnose(src, s, n)]
        if margins:
            print(
                f"{ref} vs {cand} ({preset}, {dtype}), {len(margins)} seeds: systematic findings {findings}, largest "
                f"z / threshold {max(margins):.2f} (median {sorted(margins)[len(margins) // 2]:.2f}); hypotheses "
                f"stated on the 3 worst taps: {len(stated)} {stated[:3]} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


def _load(text: str, model: Path, dtype: str):
    """A side as `diff` reads it (`hf:attn=sdpa`, `module:...`), loaded."""
    spec = parse_side(text, "cand")
    return load_candidate(spec.name, model, dtype, **spec.options)


if __name__ == "__main__":
    main()
