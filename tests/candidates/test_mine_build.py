"""Building the mine engine: a build killed mid-way must not hang every later use."""

from __future__ import annotations

import os
import time

from qwen3dbg.candidates.mine.build import STALE_LOCK_S, _drop_stale_lock


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    old, live = tmp_path / "old" / "lock", tmp_path / "live" / "lock"
    for lock in (old, live):
        lock.parent.mkdir()
        lock.touch()
    past = time.time() - STALE_LOCK_S - 60
    os.utime(old, (past, past))
    _drop_stale_lock(old)
    _drop_stale_lock(live)
    _drop_stale_lock(tmp_path / "none" / "lock")  # no lock: nothing to do
    assert not old.exists() and live.exists()
