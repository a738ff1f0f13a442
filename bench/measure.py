"""What the benches measure of a process: its peak anonymous memory and the bytes it wrote."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _status(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples RssAnon of this process (resident memory less mapped files) every `every` s; `.peak`, `.base`
    (at entry) in bytes, and `.at`: what `where()` said when the peak was sampled (the run's phase)."""

    def __init__(self, every: float = 0.005, where=lambda: None):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.where, self.at = where, None
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        return _status("RssAnon:") * 1024

    def _run(self):
        while not self._stop.is_set():
            now = self.now()
            if now > self.peak:
                self.peak, self.at = now, self.where()
            time.sleep(self.every)

    def __enter__(self):
        self.base = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def bytes_written() -> int:
    """Every byte this process has handed to write() so far (/proc/self/io wchar): files, pipes, terminals."""
    return _status("wchar:", "/proc/self/io")


def _descendants(root: int) -> list[int]:
    """Every live process below `root` (vLLM's worker processes and their helpers), from /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class TreeAnon(PeakAnon):
    """PeakAnon of this process and every process below it, summed at each sample (`.peak`); `.children_written`:
    the bytes the processes below it sent to storage (/proc/PID/io write_bytes, the last value seen of each;
    their socket and pipe traffic is not storage)."""

    def __init__(self, every: float = 0.05, where=lambda: None):
        super().__init__(every, where)
        self._written: dict[int, int] = {}

    def now(self) -> int:
        total = _status("RssAnon:") * 1024
        for pid in _descendants(os.getpid()):
            try:
                total += _status("RssAnon:", f"/proc/{pid}/status") * 1024
                self._written[pid] = _status("write_bytes:", f"/proc/{pid}/io")
            except OSError:
                pass
        return total

    @property
    def children_written(self) -> int:
        return sum(self._written.values())
