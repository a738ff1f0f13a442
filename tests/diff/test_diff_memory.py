"""What a diff holds in memory: a tap too large to hold is refused before the run with what to drop, and a run
about to exhaust memory stops with what it found (diff/guard.py)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import DECODE, PROMPT, cli

import qwen3dbg.diff.run as diff_run
import qwen3dbg.diff.streams as streams
from qwen3dbg.diff import guard, run_diff
from qwen3dbg.diff.summary import summary
from qwen3dbg.util.errors import UserError

#: the standalone port maps attention scores and probabilities
PORT = "module:qwen3dbg.candidates.ports.standalone_qwen3:load"


@pytest.fixture(scope="module")
def dense(models):
    return models("tiny-dense")


LONG = [(7 * i) % 512 for i in range(256)]


@pytest.mark.parametrize(
    "free, refusal",
    [
        # 8 MB free: the attention maps' copies (1 MB a layer at 256 tokens: 4 heads x 256 x 256 float32)
        # pass half of it, the logits' (256 x 512 in the run's bfloat16, 262 kB) do not
        (8 << 20, r"layers\.\d+\.attn_(scores|probs) is 1\.0 MB .* leave attn_scores and attn_probs out"),
        # 2 MB free: the logits do too, and leaving the attention out would not help
        (2 << 20, r"^logits is 262 kB .*: diff a shorter prompt$"),
    ],
)
def test_a_tap_past_the_queue_and_the_memory_is_refused_naming_what_to_drop(dense, monkeypatch, free, refusal):
    """The tiny model's taps at 256 tokens stand in for a long prompt's: with a 64 kB queue they pass its
    bound, and the diff is refused before its sides run, saying which taps to leave out, or that only a
    shorter prompt helps."""
    monkeypatch.setattr(streams, "QUEUE_BYTES", 64 << 10)
    monkeypatch.setattr(guard, "available_bytes", lambda: free)
    ran = []
    monkeypatch.setattr(diff_run, "ThreadSide", lambda *a: ran.append(a))
    with pytest.raises(UserError, match=refusal):
        run_diff("hf", PORT, model_dir=dense, token_ids=LONG, decode_ids=DECODE)
    assert not ran


def test_taps_within_the_queue_are_never_refused_however_little_memory_is_free(dense, monkeypatch):
    """Memory short of the queue's own bound is the watchdog's to judge during the run, not a refusal."""
    monkeypatch.setattr(guard, "available_bytes", lambda: 64 << 10)
    monkeypatch.setattr(guard.Watchdog, "_watch", lambda self: None)
    assert run_diff("hf", PORT, model_dir=dense, token_ids=PROMPT, decode_ids=DECODE).exit_code == 0


def test_a_run_running_out_of_memory_stops_with_what_it_compared(dense, monkeypatch):
    """Memory "runs out" once the prefill's layer 1 is reached: the run stops with a sentence, keeps the
    taps compared until then, and exits 2 (not judged clean)."""
    free = {"bytes": 1 << 50}
    monkeypatch.setattr(guard, "available_bytes", lambda: free["bytes"])

    def progress(step: int, layer: int | None) -> None:
        if (step, layer) == (0, 1):
            free["bytes"] = 0
            time.sleep(10 * guard.PERIOD)  # the watchdog looks meanwhile

    result = run_diff("hf", "scratch", model_dir=dense, token_ids=PROMPT, decode_ids=DECODE, progress=progress)
    assert result.stopped and "memory available fell" in result.stopped
    assert result.taps and all(t.step == 0 for t in result.taps)
    assert result.exit_code == 2 and result.verdict.startswith("not finished")


def test_the_reserve_from_the_environment_stops_the_cli_and_writes_the_json(dense, tmp_path, monkeypatch):
    """A reserve above all the machine's memory stops the run at the watchdog's first look; the report and
    its JSON are still written."""
    monkeypatch.setenv("QWEN3DBG_MEMORY_RESERVE_MB", str(1 << 40))
    out = tmp_path / "r.json"
    ids = ",".join(map(str, PROMPT))
    code = cli("diff", "--cand", "scratch", "--model", dense, "--token-ids", ids, "--decode-steps", 2, "--json", out)
    written = json.loads(out.read_text())
    assert code == 2 and written["stopped"].startswith("stopped early") and written["exit_code"] == 2


def test_a_divergence_found_before_the_stop_stands_and_is_said_undiagnosed(dense, monkeypatch):
    """A stop after the first divergence keeps it (exit 1) and says the diagnosis was not run, rather than
    that nothing explains it."""
    free = {"bytes": 1 << 50}
    monkeypatch.setattr(guard, "available_bytes", lambda: free["bytes"])

    def progress(step: int, layer: int | None) -> None:
        if (step, layer) == (0, 2):
            free["bytes"] = 0
            time.sleep(10 * guard.PERIOD)

    result = run_diff("hf", "rope-interleaved", model_dir=dense, token_ids=PROMPT, decode_ids=DECODE, progress=progress)
    lines = dict(summary(result))
    assert result.exit_code == 1 and result.stopped and lines["not finished"] == result.stopped
    assert lines["diagnosis"].startswith("not run")


def test_taps_set_aside_out_of_order_hold_back_the_side_that_produced_them(monkeypatch):
    """A side producing a step's taps in reverse: the comparison sets the later ones aside while it waits for
    the first, and those count in the side's byte bound, so the side runs no further ahead than the bound
    (plus the one tap an empty queue admits)."""
    import threading

    import torch

    budget, tap = 4 << 10, 1 << 10
    monkeypatch.setattr(streams, "QUEUE_BYTES", budget)
    names = [f"t{i}" for i in range(12)]
    produced, schedule = [], streams.Schedule([], 1)
    go = threading.Event()

    def produce(sink):
        for name in names[:6][::-1]:  # the first half out of order: t5 .. t0
            sink(name, torch.zeros(tap // 4))
            produced.append(name)
        go.wait(5)
        for name in names[6:]:
            sink(name, torch.zeros(tap // 4))
            produced.append(name)
        sink.end_step()

    side = streams.ThreadSide("s", produce, lambda n: True, True, schedule)
    assert side.take(0, "t0") is not None  # t5..t1 now set aside: 5 kB held
    go.set()
    time.sleep(0.5)
    held_ahead = len(produced) - 1  # taps produced and not yet taken
    assert held_ahead * tap <= budget + 2 * tap, produced
    for name in names[1:]:
        assert side.take(0, name) is not None
    side.end_step(0)
    side.close()


def test_a_side_held_up_by_its_bound_copies_a_tap_only_once_the_queue_takes_it(monkeypatch):
    """A port's taps are copied (it may change them later), but not while the side waits for room: the copy
    would sit beside the original for as long as the comparison takes."""
    import threading

    import torch

    q = streams.TapQueue(budget=1 << 10)
    cancelled = threading.Event()
    sink = streams.QueueSink(q, lambda n: True, False, cancelled)
    sink("first", torch.zeros(256))  # fills the queue's bound
    copies, clone = [], torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: copies.append(t.numel()) or clone(t, *a, **k))
    waiting = threading.Thread(target=sink, args=("second", torch.zeros(256)))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and copies == []
    assert q.get(timeout=1)[1] == "first"
    waiting.join(5)
    assert copies == [256] and q.get(timeout=1)[1] == "second"


def test_past_the_layers_the_window_keeps_only_what_the_tail_reads(dense):
    """At final_norm and the logits (a prompt's largest taps) the window holds the last layer as it holds the
    layer before any other: the reference's taps and every side's resid_out, the caches; the golden's and the
    candidate's other taps of that layer are dropped. A divergence there still freezes all of that."""
    import torch

    from qwen3dbg.diff.window import Window
    from qwen3dbg.model.config import load_config
    from qwen3dbg.tapstore.schema import step_taps
    from qwen3dbg.tapstore.store import StepInfo

    cfg = load_config(dense)
    last = cfg.num_hidden_layers - 1
    info = StepInfo(0, [PROMPT], [list(range(len(PROMPT)))])
    window = Window(torch.float32)
    for spec in step_taps(cfg, 1, len(PROMPT), len(PROMPT)):
        window.add(info, spec, spec.name == "final_norm", {r: torch.zeros(1) for r in ("gold", "ref", "cand")})
    window.finish()
    kept = {(role, name) for role, _, name in window.frozen}
    for role in ("gold", "ref", "cand"):
        assert {(role, f"layers.{last}.resid_out"), (role, f"layers.{last}.k_cache"), (role, "final_norm")} <= kept
    assert ("ref", f"layers.{last}.q_proj") in kept
    assert not {("gold", f"layers.{last}.q_proj"), ("cand", f"layers.{last}.q_proj")} & kept
    assert not any(name.startswith(f"layers.{last - 1}.") and "cache" not in name for _, name in kept)


def test_a_decode_steps_whole_cache_is_cut_to_its_slots_only_once_the_candidate_shows_slots_alone(monkeypatch):
    """Another side's whole cache is of use only to judge old slots a candidate changed; a candidate that hands
    on the slots it wrote alone cannot show that. Until it has, and at the prefill, caches pass whole; after,
    a decode step's cache past FULL_CACHE_BYTES is cut to its written slots, a copy that holds no view of the
    whole; other taps pass as they are."""
    import threading

    import torch

    from qwen3dbg.tapstore.store import StepInfo

    monkeypatch.setattr("qwen3dbg.tapstore.store.FULL_CACHE_BYTES", 1000)
    steps = [StepInfo(0, [[1, 2, 3]], [[0, 1, 2]]), StepInfo(1, [[4]], [[3]]), StepInfo(2, [[5]], [[4]])]
    schedule, q = streams.Schedule(steps, 3), streams.TapQueue(budget=1 << 30)
    sink = streams.QueueSink(q, lambda n: True, True, threading.Event(), schedule.written)
    cache = torch.arange(4 * 5 * 64, dtype=torch.float32).reshape(1, 4, 5, 64)  # 5 KB, past the bound
    small = cache[:, :, :, :8].contiguous()  # 640 bytes: within it

    def handed(step: int, name: str, t):
        sink.step = step
        sink(name, t)
        return q.get(timeout=1)[2]

    assert handed(1, "layers.0.k_cache", cache) is cache  # the candidate has not shown slots alone yet
    schedule.slots_only.set()
    assert handed(0, "layers.0.k_cache", cache) is cache  # the prefill's cache
    assert handed(1, "layers.0.mlp.up", cache) is cache  # no cache
    assert handed(2, "layers.0.v_cache", small) is small  # within FULL_CACHE_BYTES
    cut = handed(2, "layers.3.v_cache", cache)
    assert isinstance(cut, streams.CacheSlots) and cut.positions == [4] and cut.full is None
    assert torch.equal(cut.values, cache[:, :, 4:5]) and cut.values.untyped_storage().nbytes() == 4 * 64 * 4


def test_the_comparison_says_slots_alone_only_for_a_candidate_whose_decode_cache_is_slots_alone(
    dense, tmp_path, monkeypatch
):
    from qwen3dbg.run.capture import capture, forced_steps
    from qwen3dbg.run.registry import load_candidate

    schedules = []
    init = streams.Schedule.__init__
    monkeypatch.setattr(streams.Schedule, "__init__", lambda self, *a: schedules.append(self) or init(self, *a))
    clean = run_diff("hf", "scratch", model_dir=dense, token_ids=PROMPT, decode_ids=DECODE)
    assert clean.first_divergence is None and not schedules[-1].slots_only.is_set()
    monkeypatch.setattr("qwen3dbg.tapstore.store.FULL_CACHE_BYTES", 0)  # the store keeps decode caches as slots
    path = capture(load_candidate("scratch", dense, "float32"), forced_steps(PROMPT, DECODE), tmp_path / "s")
    result = run_diff("hf", f"store:{path}", model_dir=dense)
    assert result.first_divergence is None and not result.not_compared and schedules[-1].slots_only.is_set()
