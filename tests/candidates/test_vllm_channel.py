"""The channel that brings `vllm:tp=N` workers' taps to the differ (candidates/vllm/channel.py), without vLLM:
ranks (threads here, vLLM's worker processes in a run) send their shards over it; it is bounded by its sockets
and gathers each tap from every rank."""

from __future__ import annotations

import threading
import time

import torch

from qwen3dbg.candidates.vllm.channel import Receiver, Sender
from qwen3dbg.tapstore.store import Shard

WIDTH = 1 << 20  # 4 MB of float32 per rank and tap: far more than a socket's buffer
TAPS = [torch.randn(1, 2, 2 * WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _ranks(rx: Receiver, sent: list[int]) -> list[threading.Thread]:
    """Two ranks, each sending its half of every tap in TAPS, then ending the step; `sent[r]`: taps rank r has
    finished sending."""

    def rank(r: int) -> None:
        s = Sender(rx.address, rx.authkey, r)
        for i, whole in enumerate(TAPS):
            s.tap(
                f"layers.{i}.q_proj",
                Shard("split", 2, r * WIDTH, (r + 1) * WIDTH),
                whole[..., r * WIDTH :][..., :WIDTH],
            )
            sent[r] += 1
        s.end_step()

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    rx.connected()
    return threads


def test_a_rank_runs_at_most_one_tap_ahead_and_each_tap_is_gathered_from_both():
    rx = Receiver(2)
    sent = [0, 0]
    threads = _ranks(rx, sent)
    time.sleep(0.5)
    assert sent == [0, 0]  # nothing read yet: each rank waits in its first send
    got = []

    def hand(name, tap):
        assert max(sent) <= len(got) + 1  # the taps read so far, and the one each rank finished since
        got.append((name, tap.whole.clone(), tap.kind))

    assert rx.step(hand) is None
    assert [n for n, _, _ in got] == [f"layers.{i}.q_proj" for i in range(4)]
    assert all(torch.equal(t, whole) and kind == "split" for (_, t, kind), whole in zip(got, TAPS))
    for t in threads:
        t.join(5)
    rx.close()


def test_a_comparison_that_stops_still_drains_the_step_so_the_ranks_finish():
    rx = Receiver(2)
    sent = [0, 0]
    threads = _ranks(rx, sent)

    def hand(name, tap):
        raise KeyboardInterrupt("stopped")

    error = rx.step(hand)
    assert isinstance(error, KeyboardInterrupt)
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert sent == [4, 4]
    rx.close()
