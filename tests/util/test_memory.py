"""memory.trim: the heap's holes a cache grown by concatenation leaves go back to the system."""

import platform

import pytest
import torch
from helpers import cli

from qwen3dbg.util import memory


def _anon() -> int:
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
@pytest.mark.parametrize("caches, mb", [(16, 2), (4, 8)])
def test_trim_hands_back_the_holes_of_caches_grown_by_concatenation(caches, mb):
    memory.for_decode()  # blocks up to 32 MB from the heap, as in a diff's decode steps
    try:
        held = [torch.zeros(mb << 20, dtype=torch.uint8) for _ in range(caches)]
        slot = torch.ones(4096, dtype=torch.uint8)
        base = _anon()
        for _ in range(30):  # one slot more a step, every cache copied, as HF's DynamicCache does
            held = [torch.cat([c, slot]) for c in held]
        grown = _anon() - base
        memory.trim()
        kept = _anon() - base
    finally:
        memory.for_prefill()
    added = caches * 30 * slot.nbytes  # what the caches really grew by
    assert grown > 4 * added  # the holes, or the test shows nothing
    assert kept < added + grown / 4


def test_capture_trims_the_heaps_after_every_step(tmp_path, models, monkeypatch):
    trimmed = []
    monkeypatch.setattr(memory, "trim", lambda: trimmed.append(1))
    ids = ["--token-ids", "5,6,7", "--decode-ids", "8,9"]
    assert cli("capture", "--impl", "scratch", "--model", models("tiny-dense"), *ids, "--out", tmp_path / "s") == 0
    assert len(trimmed) == 3  # the prefill and two decode steps
