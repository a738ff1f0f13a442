"""Progress of long work for a person watching: a live line on a terminal, plain lines in a log.

A diff or a capture at real lengths runs for minutes, and some of its phases (an fp64 prefill over 2048
tokens, a port's first layer, writing a large JSON) emit no event for longer than a person waits: a log
(CI, `| tee`) that stays silent reads as a hang. So each change of phase is said, the step and layer at most
every `every` seconds, and a heartbeat repeats the phase with its elapsed time whenever nothing was said for
`every` seconds: no silence is longer than that, from the first second to the last file written.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from rich.console import Console


class Phases:
    """`status(msg)`, `progress(step, layer)` and `count(done, total)` for one command (`label`), rendered
    on `console` (stderr), which parses no markup: messages quote the sides' specs and paths as they are."""

    def __init__(
        self, console: Console, label: str = "diff", every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        self.console, self.label, self.every, self.clock = console, label, every, clock
        self.live = console.is_terminal
        self.phase, self._t0 = label, clock()
        self._said = self._t0  # when a line was last printed (or the live line last changed)
        self._counted = self._t0 - every  # when a step/layer/count was last shown
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._status = console.status(label) if self.live else None

    def __enter__(self) -> "Phases":
        if self._status is not None:
            self._status.__enter__()
        self._beater = threading.Thread(target=self._beat_until_stopped, name="qwen3dbg-heartbeat", daemon=True)
        self._beater.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beater.join()
        if self._status is not None:
            self._status.__exit__(*exc)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 5)):
            self.beat()

    def _say(self, text: str) -> None:
        with self._lock:
            self._said = self.clock()
            elapsed = self._said - self._t0
            if self._status is not None:
                self._status.update(f"{self.label} [{elapsed:.0f} s]: {text}")
            else:
                self.console.print(f"{self.label} [{elapsed:6.1f} s] {text}", highlight=False, soft_wrap=True)

    def beat(self) -> None:
        """Say the phase again when nothing was said for `every` seconds (the heartbeat thread calls this)."""
        if self.clock() - self._said >= self.every:
            self._say("still working" if self.phase == self.label else f"{self.phase} (still working)")

    def status(self, msg: str) -> None:
        self.phase = msg
        self._say(msg)

    def _due(self) -> bool:
        now = self.clock()
        if self.live or now - self._counted >= self.every:
            self._counted = now
            return True
        return False

    def progress(self, step: int, layer: int | None) -> None:
        if self._due():
            where = f"layer {layer}" if layer is not None else "done"
            self._say(f"{self.phase}: step {step}{' (prefill)' if step == 0 else ''}, {where}")

    def count(self, done: int, total: int, unit: str) -> None:
        if self._due() or done == total:
            self._say(f"{self.phase}: {done}/{total} {unit}")
