"""What a diff may hold in memory: a tap too large to hold is refused before the run, and a run about to
exhaust memory is stopped with what it found so far.

Each live side hands its taps to the comparison through a queue bounded in bytes (streams.QUEUE_BYTES),
which admits one tap whatever its size; a tap past that bound (an attention matrix or the logits of a long
prompt) is held up to three times per side: one being compared, one queued, one just copied by the side.
"""

from __future__ import annotations

import os
import threading

import torch

import qwen3dbg.diff.streams as streams
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import step_taps
from qwen3dbg.tapstore.store import StepInfo
from qwen3dbg.util.errors import UserError

#: the share of the available memory the held taps may take: the rest is the sides' own forwards (the
#: golden's fp64 pass, each side's activations and weights)
HOLD_SHARE = 0.5
#: copies of a tap past the queue's bound a side may hold at once (compared, queued, being copied)
COPIES = 3
#: MemAvailable below which a run stops, or that share of a smaller machine's memory
#: (QWEN3DBG_MEMORY_RESERVE_MB overrides): past it the kernel's out-of-memory killer ends the process without
#: a word, and all that was found is lost
RESERVE, RESERVE_SHARE = 1 << 30, 1 / 16
#: seconds between two looks at MemAvailable: a prefill allocates at most a few hundred MB in that time
PERIOD = 0.05


def _meminfo(field: str) -> int | None:
    """A field of /proc/meminfo in bytes, None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    return _meminfo("MemAvailable")


def reserve_bytes() -> int:
    text = os.environ.get("QWEN3DBG_MEMORY_RESERVE_MB")
    if text is None:
        total = _meminfo("MemTotal")
        return RESERVE if total is None else min(RESERVE, int(total * RESERVE_SHARE))
    try:
        return int(float(text) * (1 << 20))
    except ValueError:
        raise UserError(f"QWEN3DBG_MEMORY_RESERVE_MB={text!r} is not a number of megabytes") from None


def check_taps_fit(
    cfg: Qwen3Config, first: StepInfo, dtype: torch.dtype, live: dict[str, str], compared, available: int | None
) -> None:
    """Refuse, before any side runs, a diff whose largest compared tap passes the queue's bound and whose
    copies on the live sides (`live`: role -> the side as typed) would take more than HOLD_SHARE of the
    available memory. The prefill holds the largest taps: [B,nH,T,S] attention, [B,T,V] logits."""
    if available is None or not live:
        return
    batch, tokens = len(first.token_ids), first.tokens
    specs = [t for t in step_taps(cfg, batch, tokens, first.positions[0][-1] + 1) if compared(t.name)]
    if not specs:
        return
    # ports commonly keep the attention's softmax in float32 (HF eager, the standalone port)
    size = lambda t: t.numel * (max(dtype.itemsize, 4) if t.op in streams.ATTENTION_OPS else dtype.itemsize)  # noqa: E731
    held = lambda t: len(live) * (streams.QUEUE_BYTES + COPIES * size(t))  # noqa: E731
    over = [t for t in specs if size(t) > streams.QUEUE_BYTES and held(t) > HOLD_SHARE * available]
    if not over:
        return
    rest = [t for t in over if t.op not in streams.ATTENTION_OPS]
    if rest:  # the logits or the activations themselves: only a shorter prompt helps
        t, drop = max(rest, key=size), "diff a shorter prompt"
    else:
        t = max(over, key=size)
        drop = (
            "leave attn_scores and attn_probs out (unmap them from a module: port's mapping, or use "
            "hf:attn=sdpa): they are then reported as not compared"
        )
    raise UserError(
        f"{t.name} is {_amount(size(t))} at {tokens} tokens, so the {len(live)} live side(s) "
        f"({', '.join(live.values())}) would hold about {_amount(held(t))} of taps, more than "
        f"{HOLD_SHARE:.0%} of the {_amount(available)} available: {drop}"
    )


def _amount(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


class Watchdog:
    """Looks at MemAvailable every PERIOD seconds while a diff runs; below the reserve it cancels the sides
    (`cancelled`) and says why in `stopped`, so the comparison ends with what it has compared."""

    def __init__(self, cancelled: threading.Event, reserve: int | None = None):
        self.cancelled, self.reserve = cancelled, reserve_bytes() if reserve is None else reserve
        self.stopped: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qwen3dbg-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(PERIOD):
            free = available_bytes()
            if free is not None and free < self.reserve:
                self.stopped = (
                    f"stopped early: the memory available fell to {free / 1e9:.2f} GB, under the "
                    f"{self.reserve / 1e9:.2f} GB reserve (QWEN3DBG_MEMORY_RESERVE_MB); the taps compared until "
                    "then are reported. Diff a shorter prompt, fewer decode steps, or leave the attention "
                    "taps out"
                )
                self.cancelled.set()
                return
