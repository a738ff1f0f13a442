"""No silence longer than the heartbeat on long work: each phase is said when it starts, steps and counts at a
bounded rate, and a phase that emits nothing for `every` seconds is said again (tested on a fake clock)."""

from __future__ import annotations

import io
import re
import threading

from helpers import cli
from rich.console import Console

from qwen3dbg.util.progress import Phases


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _log() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def _stamps(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"\[\s*([0-9.]+) s\]", text)]


def test_a_phase_that_emits_nothing_is_said_again_every_period_of_its_silence():
    console, out = _log()
    clock = _Clock()
    shown = Phases(console, "capture", every=5.0, clock=clock)
    shown.status("picking 30 decode ids with a greedy fp64 run")
    for tenth in range(1, 600):  # a 60 s phase without a single event, the heartbeat polled every 0.1 s
        clock.now = tenth / 10
        shown.beat()
    stamps = _stamps(out.getvalue())
    assert stamps[0] == 0.0 and stamps[-1] >= 55.0
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 5.0 < 10.0
    assert out.getvalue().count("greedy fp64 run (still working)") == len(stamps) - 1


def test_events_within_a_phase_are_shown_at_a_bounded_rate_and_count_as_speech():
    console, out = _log()
    clock = _Clock()
    shown = Phases(console, "diff", every=5.0, clock=clock)
    shown.status("comparing")
    for layer in range(100):  # a layer every 0.5 s
        clock.now = 0.5 * (layer + 1)
        shown.progress(0, layer)
        shown.beat()
    lines = out.getvalue().splitlines()
    assert "still working" not in out.getvalue()  # the layer lines were enough
    assert 8 <= len(lines) - 1 <= 11  # one per 5 s of 50 s
    assert max(b - a for a, b in zip(_stamps(out.getvalue()), _stamps(out.getvalue())[1:])) <= 5.0


def test_the_heartbeat_thread_speaks_while_the_main_thread_is_busy():
    console, out = _log()
    clock = _Clock()
    with Phases(console, "diff", every=5.0, clock=clock) as shown:
        shown.status("prefill of the fp64 golden")
        clock.now = 6.0  # the main thread is stuck in one long op: only the heartbeat can speak
        spoke = threading.Event()
        for _ in range(100):
            if "still working" in out.getvalue():
                spoke.set()
                break
            spoke.wait(0.05)
    assert spoke.is_set()


def test_capture_says_each_phase_from_the_greedy_ids_to_the_last_file(models, tmp_path, capsys):
    assert (
        cli(
            "capture",
            "--impl",
            "scratch",
            "--model",
            models("tiny-dense"),
            "--token-ids",
            "5,17",
            "--decode-steps",
            "2",
            "--out",
            tmp_path / "s",
        )
        == 0
    )
    err = capsys.readouterr().err
    order = [
        "reading the model",
        "picking 2 decode tokens greedily with the fp64 golden",
        "loading scratch",
        "taps written",
    ]
    at = [err.index(phase) for phase in order]
    assert at == sorted(at) and err.rstrip().endswith(f"wrote tap store {tmp_path / 's'}")


def test_diff_says_each_phase_up_to_the_last_report_written(models, tmp_path, capsys):
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    assert cli("diff", "--cand", "scratch", "--model", models("tiny-dense"), "--json", j, "--html", h) == 0
    err = capsys.readouterr().err
    order = ["loading ref", "comparing", "step 0 (prefill)", "diagnosing", f"writing {j}", f"writing {h}"]
    at = [err.index(phase) for phase in order]
    assert at == sorted(at) and err.rstrip().endswith(f"wrote {h}")


def test_every_long_command_keeps_a_heartbeat_in_a_log(models, tmp_path, monkeypatch):
    """make-model, scan-checkpoint and diff-weights show a bar only on a terminal: in a log their work runs
    under the heartbeat, as capture's and diff's does."""
    import qwen3dbg.util.progress as progress

    entered = []

    class Recorded(Phases):
        def __enter__(self):
            entered.append(self.label)
            return super().__enter__()

    monkeypatch.setattr(progress, "Phases", Recorded)
    model = tmp_path / "m"
    assert cli("make-model", model) == 0
    assert cli("scan-checkpoint", model) == 0
    assert cli("diff-weights", model, models("tiny-dense")) == 0
    assert entered == ["make-model", "scan-checkpoint", "diff-weights"]
