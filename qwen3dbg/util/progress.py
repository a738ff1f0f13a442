"""Progress of long work for a person watching: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import time

from rich.console import Console


# A diff at real lengths runs for minutes; a log (CI, `| tee`) that stays silent that long reads as a hang, so
# where the output is not a terminal each change of phase, and the step and layer at most every few seconds, is
# printed as one plain line.
class DiffProgress:
    """`status(msg)` and `progress(step, layer)` for `run_diff`, rendered on `console` (stderr), which parses
    no markup: messages quote the sides' specs and paths as they are."""

    def __init__(self, console: Console, every: float = 5.0):
        self.console, self.every = console, every
        self.live = console.is_terminal
        self.phase, self._last, self._t0 = "diff", 0.0, time.perf_counter()
        self._status = console.status("diff") if self.live else None

    def __enter__(self) -> "DiffProgress":
        if self._status is not None:
            self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def _say(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"diff: {text}")
        else:
            elapsed = time.perf_counter() - self._t0
            self.console.print(f"diff [{elapsed:6.1f} s] {text}", highlight=False, soft_wrap=True)

    def status(self, msg: str) -> None:
        self.phase = msg
        self._last = time.perf_counter()
        self._say(msg)

    def progress(self, step: int, layer: int | None) -> None:
        now = time.perf_counter()
        if self.live or now - self._last >= self.every:
            self._last = now
            where = f"layer {layer}" if layer is not None else "done"
            self._say(f"{self.phase}: step {step}{' (prefill)' if step == 0 else ''}, {where}")
