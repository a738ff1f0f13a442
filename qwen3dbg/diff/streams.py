"""The three sides of a diff as streams of taps, compared in lockstep as they are produced.

Every side runs in its own thread and hands each tap to a queue bounded in bytes (`TapQueue`); the
comparison takes them by (step, name) in forward order, so memory holds a few large taps of each side or
a step's worth of small ones, and nothing is written to disk. A side that produces a tap out of order
(HF's cache after its attention) has the taps the comparison set aside counted in that bound. The fp64
golden is one pass over the whole forced sequence (golden.py keeps and replays its rows).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from qwen3dbg.tapstore.shards import Gathered, gathered
from qwen3dbg.run.candidate import Candidate
from qwen3dbg.tapstore.schema import parse_tap_name
from qwen3dbg.tapstore import store as tapstore
from qwen3dbg.tapstore.store import StepInfo, TapStore

CACHE_OPS = frozenset({"k_cache", "v_cache"})
ATTENTION_OPS = frozenset({"attn_scores", "attn_probs"})


@dataclass(frozen=True)
class CacheSlots:
    """A decode step's cache tap as the slots it wrote: `values` [B,nKV,n,D] at logical `positions`, and the
    whole cache after the step [B,nKV,S,D] where the side has it."""

    values: torch.Tensor
    positions: list[int]
    full: torch.Tensor | None = None


def written_slots(v: torch.Tensor | CacheSlots, positions: list[int]) -> torch.Tensor:
    """The cache slots [B,nKV,n,D] a decode step writing `positions` wrote, from the slots themselves or the
    whole cache (a view)."""
    if isinstance(v, CacheSlots):
        return v.values
    return v[:, :, positions[0] : positions[-1] + 1]


@dataclass(frozen=True)
class QueryRows:
    """A tap a side holds for some token rows only: `values` with n rows on the T axis at `positions` (an
    engine's attention rows [B,nH,n,S], a serving engine's sampled logits [B,n,V], the rows a prefill
    computed past a cached prefix)."""

    values: torch.Tensor
    positions: list[int]


class Cancelled(Exception):
    """Raised inside a side's thread when the comparison stopped early: it unwinds the producer."""


class Schedule:
    """The steps of a diff: all known in advance (forced ids), or published one at a time by the golden as
    it picks each next token greedily (`--decode-steps`), which the other sides then wait for."""

    def __init__(self, steps: list[StepInfo], total: int):
        self.steps, self.total = list(steps), total
        self._ready = threading.Condition()
        self.cancelled = threading.Event()
        #: the error of the side that failed first: every other side stops (Cancelled) because of it
        self.failed: BaseException | None = None
        #: set once the candidate hands a decode step's cache on as the slots it wrote alone. Another side's
        #: whole cache is there only to judge old slots a candidate changed, which such a candidate cannot
        #: show: from then on a side cuts its own to the written slots as it produces them (`written`).
        #: Whole, HF's at 2048 tokens on the 0.6B shape is 264 MB a step: twice the queue's bound, it held
        #: the reference in lockstep with the comparison.
        self.slots_only = threading.Event()

    def get(self, s: int) -> StepInfo:
        with self._ready:
            while len(self.steps) <= s:
                if self.cancelled.is_set():
                    raise Cancelled()
                self._ready.wait(0.2)
            return self.steps[s]

    def written(self, step: int) -> list[int] | None:
        """The cache slots decode step `step` writes, once `slots_only` is set (else None)."""
        if step == 0 or not self.slots_only.is_set():
            return None
        return self.get(step).positions[0]

    def publish(self, info: StepInfo) -> None:
        with self._ready:
            self.steps.append(info)
            self._ready.notify_all()


_END = "end"
#: bytes of taps a side may hand out ahead of the comparison: a decode step's hundreds of small taps pass
#: without waiting for each to be compared (a handoff per tap left the cores idle half the time), while
#: a prefill's large ones queue a few at a time
QUEUE_BYTES = 128 << 20


def _nbytes(t) -> int:
    if isinstance(t, Gathered):  # a tensor-parallel side's tap: the ranks' shards and, unless a copy, their gather
        shards = sum(p.value.nbytes for p in t.parts)
        return shards + (0 if any(p.value is t.whole for p in t.parts) else t.whole.nbytes)
    if isinstance(t, torch.Tensor):
        return t.nbytes
    return t.values.nbytes if isinstance(t, (CacheSlots, QueryRows)) else 0  # RowBlocks: computed when read


class TapQueue:
    """A side's taps on their way to the comparison, at most `budget` bytes of them (one tap whatever its size).
    The bytes count the taps the comparison took early and set aside (`hold`) until it `release`s them: a
    side that produces out of order waits for them too, unless the queue is empty (the comparison may be
    waiting for the very tap it is about to put)."""

    def __init__(self, budget: int | None = None):
        self.budget, self.bytes = QUEUE_BYTES if budget is None else budget, 0
        self._items: deque = deque()
        self._changed = threading.Condition()

    def wait_room(self, size: int, cancelled: threading.Event) -> None:
        """Until a tap of `size` bytes is admitted (the one producer is the only one to add bytes: the room
        stays until it puts)."""
        with self._changed:
            while self._items and self.bytes + size > self.budget:
                if cancelled.is_set():
                    raise Cancelled()
                self._changed.wait(0.2)

    def put(self, item, cancelled: threading.Event) -> None:
        size = _nbytes(item[2])
        self.wait_room(size, cancelled)
        with self._changed:
            self._items.append((item, size))
            self.bytes += size
            self._changed.notify_all()

    def get(self, timeout: float):
        """The next item, or None after `timeout` seconds without one."""
        with self._changed:
            if not self._items and not self._changed.wait_for(lambda: self._items, timeout):
                return None
            item, size = self._items.popleft()
            self.bytes -= size
            self._changed.notify_all()
            return item

    def empty(self) -> bool:
        with self._changed:
            return not self._items

    def hold(self, t) -> None:
        """Count `t`, taken from the queue, as still held by the consumer."""
        with self._changed:
            self.bytes += _nbytes(t)

    def release(self, t) -> None:
        with self._changed:
            self.bytes -= _nbytes(t)
            self._changed.notify_all()


class QueueSink:
    """What a producer's implementation hands its taps to. Tensors are copied unless the implementation
    promises never to change a tensor it handed out (`Candidate.fresh_taps`). With `written`
    (`Schedule.written`), a decode step's whole cache past FULL_CACHE_BYTES is cut to the slots it wrote when
    nothing needs more."""

    def __init__(
        self,
        q: TapQueue,
        wanted: Callable[[str], bool],
        fresh: bool,
        cancelled: threading.Event,
        written: Callable[[int], list[int] | None] | None = None,
    ):
        self.q, self._wanted, self.fresh, self.cancelled, self.written = q, wanted, fresh, cancelled, written
        self.step = 0

    def wants(self, name: str) -> bool:
        return self._wanted(name)

    def __call__(self, name: str, t) -> None:
        if self.wants(name):
            if self.written is not None and isinstance(t, torch.Tensor) and t.nbytes > tapstore.FULL_CACHE_BYTES:
                t = self._slots(name, t)
            if isinstance(t, torch.Tensor) and not self.fresh:
                # copied once the queue has room for it: a side held up by the bound waits with no copy in hand
                self.q.wait_room(t.nbytes, self.cancelled)
                t = t.detach().clone()
            self.put((self.step, name, t))

    def _slots(self, name: str, t: torch.Tensor):
        positions = self.written(self.step) if parse_tap_name(name)[1] in CACHE_OPS else None
        if positions is None:
            return t
        return CacheSlots(written_slots(t, positions).clone(), positions)  # the slots alone, not a view

    def put(self, item) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        self.q.put(item, self.cancelled)

    def end_step(self) -> None:
        self.put((self.step, _END, None))
        self.step += 1


class Side(Protocol):
    """One side of a comparison, read by (step, name) in forward order."""

    label: str

    def take(self, step: int, name: str): ...

    def end_step(self, step: int) -> None: ...

    def close(self) -> None: ...


class ThreadSide:
    """A side whose taps come from `produce(sink)` running in a thread of its own."""

    def __init__(
        self,
        label: str,
        produce: Callable[[QueueSink], None],
        wanted: Callable[[str], bool],
        fresh: bool,
        schedule: Schedule,
        cut: bool = False,
    ):
        """`cut`: the side's whole caches are cut to written slots when the schedule says (`Schedule.written`)."""
        self.label = label
        self._q = TapQueue()
        self._early: dict[tuple[int, str], object] = {}
        self._ended: set[int] = set()
        self._error: BaseException | None = None
        self.schedule = schedule
        sink = QueueSink(self._q, wanted, fresh, schedule.cancelled, schedule.written if cut else None)

        def run() -> None:
            try:
                produce(sink)
            except Cancelled:
                pass
            except BaseException as e:  # handed to the consumer, which raises it in the main thread
                self._error = e
                schedule.failed = schedule.failed or e
                schedule.cancelled.set()
            finally:
                try:
                    sink.put((None, _END, None))
                except Cancelled:
                    pass

        self._thread = threading.Thread(target=run, name=f"qwen3dbg-{label}", daemon=True)
        self._thread.start()

    def _next(self):
        while True:
            if self._error is not None:
                raise self._error
            item = self._q.get(timeout=0.2)
            if item is not None:
                return item
            if not self._thread.is_alive() and self._q.empty():
                # cancelled because another side failed: that side's error is the one to report
                raise (
                    self._error
                    or self.schedule.failed
                    or RuntimeError(f"the {self.label} side stopped without finishing")
                )

    def take(self, step: int, name: str):
        """The side's tap `name` of `step`, or None when the step ended without it."""
        key = (step, name)
        while key not in self._early:
            if step in self._ended:
                return None
            s, n, t = self._next()
            if n == _END:
                if s is None:
                    raise self._error or RuntimeError(f"the {self.label} side ended before step {step}")
                self._ended.add(s)
            else:
                self._early[(s, n)] = t
                self._q.hold(t)
        t = self._early.pop(key)
        self._q.release(t)
        return t

    def end_step(self, step: int) -> None:
        """Drop what is left of `step` (taps outside the schema, or that nothing compared)."""
        while step not in self._ended:
            s, n, _ = self._next()
            if n == _END:
                if s is None:
                    raise self._error or RuntimeError(f"the {self.label} side ended at step {step}")
                self._ended.add(s)
        for key in [k for k in self._early if k[0] == step]:
            self._q.release(self._early.pop(key))
        self._ended.discard(step)

    def close(self) -> None:
        self.schedule.cancelled.set()
        self._thread.join(timeout=30)


class StoreSide:
    """A tap store read tap by tap, in the consumer's thread."""

    def __init__(self, label: str, store: TapStore):
        self.label, self.store = label, store

    def take(self, step: int, name: str):
        if step >= len(self.store.steps) or not self.store.has(step, name):
            return None
        return self.view(step, name, self.store.get(step, name))

    def view(self, step: int, name: str, t: torch.Tensor):
        """A stored tap as the comparison takes it: the cache slots or query rows the step declares it holds."""
        info, op = self.store.steps[step], parse_tap_name(name)[1]
        if op in CACHE_OPS and info.cache_positions is not None and info.cache_positions != list(range(t.shape[2])):
            return CacheSlots(t, info.cache_positions)
        rows = info.attention_positions if op in ATTENTION_OPS else info.logits_positions if op == "logits" else None
        if rows is not None and rows != info.positions[0]:
            return QueryRows(t, rows)
        return t

    def end_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class RankSide(StoreSide):
    """The stores of the ranks of a tensor-parallel run (`RankStores`): each tap is gathered from the ranks'
    shards when it is taken, so memory holds the ranks' shards of one tap, never more."""

    def take(self, step: int, name: str):
        if step >= len(self.store.steps) or not self.store.has(step, name):
            return None
        return gathered(self.store.parts(step, name), lambda t: self.view(step, name, t))


def candidate_producer(cand: Candidate, schedule: Schedule) -> Callable[[QueueSink], None]:
    """Real prefill and decode steps of `cand`, each on the schedule's ids."""

    def produce(sink: QueueSink) -> None:
        cand.reset()
        for s in range(schedule.total):
            info = schedule.get(s)
            with torch.no_grad():
                cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
            sink.end_step()

    return produce
