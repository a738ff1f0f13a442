"""Shared fixtures: synthetic checkpoints made once per test session, and forced steps."""

from __future__ import annotations

import os

import pytest
import torch

from qwen3dbg.capture import forced_steps
from qwen3dbg.synth import Plants, make_model

PROMPT = [5, 17, 99, 250, 3, 411, 8]
DECODE = [42, 300, 7]


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep the default model and run caches of tests out of the user's ~/.cache."""
    os.environ["QWEN3DBG_HOME"] = str(tmp_path_factory.mktemp("qwen3dbg_home"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Lazily made synthetic models by preset name (plus 'sharded': tiny-moe split into many shards)."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            if name == "sharded":
                made[name] = make_model(root / name, "tiny-moe", shard_bytes=50_000)
            elif name == "big-k-norm":
                made[name] = make_model(root / name, "tiny-dense", plants=Plants(k_norm_peak=96.5))
            else:
                made[name] = make_model(root / name, name)
        return made[name]

    return get


@pytest.fixture
def steps():
    return forced_steps(PROMPT, DECODE)


def run_steps(cand, steps):
    """Run a candidate over forced steps; return per-step dicts of taps."""
    from qwen3dbg.candidate import DictSink

    cand.reset()
    out = []
    for info in steps:
        sink = DictSink()
        cand.step(torch.tensor(info.token_ids), torch.tensor(info.positions), sink)
        out.append(sink.taps)
    return out
