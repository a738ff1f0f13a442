"""A live side whose implementation runs in a process of its own.

In one process, the reference's Python (HF's modules and their hooks: over a thousand small ops a decode step)
and the comparison's take turns at the interpreter's lock: on the 0.6B shape at 2048 tokens, once every other
side had finished, a step of HF took 0.43-0.52 s beside the comparison, 0.25-0.3 s alone. In a child process
it holds a lock of its own. Its taps
come over a socket (`wire`) to the side's thread here, which hands them to the side's queue: the byte bound
holds across the processes, since the child's send blocks while that thread waits for room. The child cuts
its whole caches to the written slots itself (`QueueSink`), told when the comparison no longer needs them.

The child is `python -c _CHILD FD`, FD one end of a socket pair: nothing is written to disk and no name is
left behind; it ends when its socket closes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import torch

from qwen3dbg.diff.streams import Cancelled, QueueSink, Schedule, ThreadSide, candidate_producer
from qwen3dbg.diff.wire import Wire
from qwen3dbg.run.sides import SideSpec
from qwen3dbg.tapstore.schema import parse_tap_name
from qwen3dbg.util import memory
from qwen3dbg.util.dtypes import dtype_name
from qwen3dbg.util.errors import UserError

#: decode steps from which a live reference runs in a process of its own: below, starting one (importing
#: torch and the implementation again) costs about what it saves
MIN_DECODE_STEPS = 32
#: the child's torch threads from the first decode step on. A decode step's ops are too small for a second
#: thread to gain much (HF alone at 2048 tokens of the 0.6B shape: 0.25 s a step on 2 threads, 0.30 on 1), and
#: the other core is the comparison's and the candidate's: with 1, every side decoded at 0.50 s a step (2048 +
#: 64, --cand vllm), with 2 at 0.80
DECODE_THREADS = 1
#: the child's program (not `-m`: the package imports this module before it would run as __main__)
_CHILD = "import sys; from qwen3dbg.diff.process_side import child; child(int(sys.argv[1]))"


class RemoteImplementation:
    """An implementation loading in a child process: what the diff asks of a loaded one (`name`,
    `missing_taps`, `manifest_extra`) and, as a side, its taps (`side`)."""

    fresh_taps = True  # every tap arrives in memory of its own

    def __init__(self, spec: SideSpec, model_dir: Path, dtype: torch.dtype):
        here, there = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what imports here, there
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(there.fileno())],
            pass_fds=[there.fileno()],
            env=env,
        )
        there.close()
        self.wire = Wire(Connection(here.detach()))
        self.text, self.name, self.missing_taps = spec.text, spec.name, frozenset()
        self._extra: dict = {}
        self._done = False
        self._sending = threading.Lock()  # the side's thread and the step feeder both send
        self.wire.send((spec.name, spec.options, str(model_dir), dtype_name(dtype)))

    def ready(self) -> None:
        """Wait until the child has loaded the implementation (its error is raised here)."""
        (_, self.name, missing), _ = self._next()
        self.missing_taps = frozenset(missing)

    def manifest_extra(self) -> dict:
        return self._extra

    def side(self, label: str, schedule: Schedule, missing: frozenset[str], cut: bool):
        """The side of the diff whose taps the child produces: it computes none of `missing` (ops no side is
        compared on; what it sends is wanted, so nothing is asked again here) and, with `cut`, cuts its caches
        as `Schedule.written` says."""
        return ProcessSide(label, self._producer(schedule, missing, cut), _sent, True, schedule, remote=self)

    def _producer(self, schedule: Schedule, missing: frozenset[str], cut: bool) -> Callable[[QueueSink], None]:
        def produce(sink: QueueSink) -> None:
            known = len(schedule.steps)
            self._send(("run", sorted(missing), cut, schedule.steps[:known], schedule.total))
            if known < schedule.total:  # greedy steps: each sent as the golden picks it
                threading.Thread(target=self._feed, args=(schedule, known), name="qwen3dbg-feed", daemon=True).start()
            told = False
            while True:
                head, value = self._next(schedule)
                if head[0] == "done":
                    self._extra, self._done = head[1], True
                    return
                if head[0] == "tap":
                    sink(head[1], value)
                    continue
                sink.end_step()
                if not told and schedule.slots_only.is_set():
                    self._send(("slots_only",))
                    told = True

        return produce

    def _next(self, schedule: Schedule | None = None) -> tuple:
        """(the child's next message, the tap's value after it or None), with its error raised here: a
        UserError as it was, any other as the side's failure with the child's traceback."""
        try:
            head, layout = self.wire.recv_head()
            value = None
            if head[0] == "tap":
                t, view = self.wire.recv_tensors(layout)
                value = view(t)
        except (EOFError, OSError):
            if schedule is not None and schedule.cancelled.is_set():
                raise Cancelled() from None
            self.stop()
            raise RuntimeError(f"{self.text}'s process ended unexpectedly (exit code {self.proc.returncode})") from None
        if head[0] == "error":
            _, text, user = head
            raise UserError(text) if user else RuntimeError(f"{self.text}'s process failed:\n{text}")
        return head, value

    def _feed(self, schedule: Schedule, start: int) -> None:
        try:
            for s in range(start, schedule.total):
                self._send(("step", schedule.get(s)))
        except (Cancelled, OSError):
            pass

    def _send(self, message: tuple) -> None:
        with self._sending:
            self.wire.send(message)

    def stop(self) -> None:
        """End the child, at once unless it has finished its run: a thread waiting on its socket then reads
        the end of it."""
        try:
            self.proc.wait(timeout=5 if self._done else 0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.wire.close()


def _sent(name: str) -> bool:
    return True


class ProcessSide(ThreadSide):
    """A `ThreadSide` whose thread reads the taps a child process produces (`RemoteImplementation`)."""

    def __init__(self, *args, remote: RemoteImplementation, **kwargs):
        self.remote = remote
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        self.schedule.cancelled.set()
        self.remote.stop()  # the thread may be waiting on the child
        super().close()
        self.remote.close()


class _WireSink(QueueSink):
    """The child's sink: each tap sent as it is produced (the send copies it, so nothing is cloned)."""

    def __init__(self, wire: Wire, wanted: Callable[[str], bool], schedule: Schedule, cut: bool):
        super().__init__(None, wanted, True, schedule.cancelled, schedule.written if cut else None)
        self.wire = wire

    def put(self, item) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        step, name, t = item
        if t is None:  # the step's end
            self.wire.send_head(("end",))
            if step == 0:
                memory.for_decode()
                torch.set_num_threads(DECODE_THREADS)
            memory.trim()
        else:
            self.wire.send_tap(("tap", name), t)


def _control(wire: Wire, schedule: Schedule) -> None:
    """The parent's messages during the run: greedy steps, the cut; its socket closed cancels the run."""
    try:
        while True:
            message = wire.recv()
            if message[0] == "step":
                schedule.publish(message[1])
            elif message[0] == "slots_only":
                schedule.slots_only.set()
    except (EOFError, OSError):
        schedule.cancelled.set()


def child(fd: int) -> None:
    """The child process: load the implementation the parent names, then run the steps it sends."""
    from qwen3dbg.model.model_dir import open_model
    from qwen3dbg.run.registry import construct
    from qwen3dbg.util.dtypes import parse_dtype

    wire = Wire(Connection(fd))
    try:
        name, options, model_dir, dtype = wire.recv()
        memory.for_prefill()
        cand = construct(name, open_model(model_dir), parse_dtype(dtype), **options)
        wire.send_head(("loaded", cand.name, sorted(cand.missing_taps)))
        _, missing, cut, steps, total = wire.recv()
        schedule = Schedule(steps, total)
        threading.Thread(target=_control, args=(wire, schedule), name="qwen3dbg-control", daemon=True).start()
        missing = frozenset(missing)
        wanted = lambda name: parse_tap_name(name)[1] not in missing  # noqa: E731
        candidate_producer(cand, schedule)(_WireSink(wire, wanted, schedule, cut))
        wire.send_head(("done", cand.manifest_extra()))
    except (Cancelled, EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent has gone or stopped the run
    except BaseException as e:  # noqa: BLE001  # told to the parent, which reports it as the side's failure
        said = ("error", str(e), True) if isinstance(e, UserError) else ("error", traceback.format_exc(), False)
        try:
            wire.send_head(said)
        except OSError:
            pass
