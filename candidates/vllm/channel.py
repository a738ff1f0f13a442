"""Taps from vLLM's worker processes to the diff's process: one Unix socket per rank, read in lockstep.

A worker sends each tap as it is produced: a small header (name, this rank's shard, what the tensor stands
for), then the tensor's bytes. The socket is the bound: a send blocks while the diff has not read the tap
before it, so a worker runs at most one tap (plus the kernel's socket buffer) ahead of the diff, and the diff
holds one tap of every rank at a time before it gathers them (`Receiver.step`), whatever the run's length.
Nothing is written to disk (the socket's name lives in a private temporary directory, removed once every rank
has connected).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from multiprocessing.connection import Client, Listener
from typing import Callable

from qwen3dbg.diff.wire import Wire
from qwen3dbg.tapstore.shards import Part, gathered
from qwen3dbg.tapstore.store import Shard

_END = "end"


class Sender:
    """A worker's end: taps of the sequence under test, each with this rank's shard of it."""

    def __init__(self, address: str, authkey: bytes, rank: int):
        self.rank = rank
        self.wire = Wire(Client(address, family="AF_UNIX", authkey=authkey))
        self.wire.send(rank)

    def tap(self, name: str, shard: Shard, value) -> None:
        self.wire.send_tap((name, shard), value)

    def end_step(self) -> None:
        self.wire.send_head((_END, None))

    def close(self) -> None:
        self.wire.close()


class Receiver:
    """The diff's end: every rank's socket, accepted while the workers install their recorders."""

    def __init__(self, world: int):
        self.world = world
        self._dir = tempfile.mkdtemp(prefix="qwen3dbg-vllm-")
        self.address = os.path.join(self._dir, "taps")
        self.authkey = os.urandom(16)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self.wires: list[Wire | None] = [None] * world
        self._accepting = threading.Thread(target=self._accept, name="qwen3dbg-vllm-accept", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        for _ in range(self.world):
            wire = Wire(self._listener.accept())
            self.wires[wire.recv()] = wire

    def connected(self, timeout: float = 120) -> None:
        """Wait for every rank (the workers connect while they install their recorders), then drop the name."""
        self._accepting.join(timeout)
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        if None in self.wires:
            raise RuntimeError(f"vLLM's worker of rank {self.wires.index(None)} did not connect to send its taps")

    def _read(self, wire: Wire):
        (name, shard), layout = wire.recv_head()
        if name == _END:
            return None
        return name, shard, *wire.recv_tensors(layout)

    def step(self, hand: Callable[[str, object], None]) -> BaseException | None:
        """Every tap of one step, each read from all ranks (in rank order: they produce taps in the same
        order) and handed on gathered (`gathered`), until every rank has ended the step. An error of `hand`
        (the comparison stopped) is returned once the step is drained: the workers, blocked on their sends,
        must still finish their forward."""
        error: BaseException | None = None
        while True:
            got = [self._read(w) for w in self.wires]
            if got[0] is None or any(g is None for g in got):
                if any(g is not None for g in got):
                    raise RuntimeError("vLLM's ranks ended a step at different taps")
                return error
            names = {g[0] for g in got}
            if len(names) != 1:
                raise RuntimeError(f"vLLM's ranks sent different taps at once: {sorted(names)}")
            name, _, _, view = got[0]
            parts = [Part(rank, g[1], g[2]) for rank, g in enumerate(got)]
            if error is None:
                try:  # one rank (a worker process at tp=1) holds the whole tap: nothing to trace back to it
                    hand(name, gathered(parts, view) if self.world > 1 else view(parts[0].value))
                except BaseException as e:  # noqa: BLE001  # handed back once the workers are drained
                    error = e

    def close(self) -> None:
        for w in self.wires:
            if w is not None:
                w.close()
