"""Shared fixtures: synthetic checkpoints made once per test session, and forced steps. Shared helpers that
are not fixtures live in helpers.py."""

from __future__ import annotations

import os

import pytest
from helpers import DECODE, PROMPT

from qwen3dbg.model.synth import Plants, make_model
from qwen3dbg.run.capture import forced_steps


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


# ---- catalogue models: tests/diff/ --------

#: key -> (preset, Plants fields, config overrides): the tiny models the bug catalogue is tested on
CATALOGUE_MODELS = {
    "dense": ("tiny-dense", {}, None),
    "moe": ("tiny-moe", {}, None),
    "moe-nonorm": ("tiny-moe-nonorm", {}, None),
    "ghost-bias": ("tiny-dense", {"ghost_bias": 0.5}, None),
    # q/k norm weights large enough that layer-0 scores pass log(65504) = 11.09; k_norm ~100 as released
    "hot-qk": ("tiny-dense", {"q_norm_peak": 40.0, "k_norm_peak": 96.5}, None),
    # reductions long enough (512, 1024) that bf16 accumulation stands out of bf16's own noise
    "wide": ("tiny-wide", {}, None),
    # long-context bugs (tests/diff/test_catalogue_long.py): a window in config.json with use_sliding_window
    # false, as Qwen2.5 configs carry one ...
    "window-512": ("tiny-dense", {}, {"sliding_window": 512}),
    "window-64": ("tiny-dense", {}, {"sliding_window": 64}),
    # ... and k_norm peaks of 6 (tiny-dense's are 20): layer-0 rows whose float16 sum of exps passes 65504
    # only after a few hundred keys
    "warm-qk": ("tiny-dense", {"k_norm_peak": 6.0}, None),
}


@pytest.fixture(scope="session")
def catalogue_model(tmp_path_factory):
    """catalogue_model(key) -> directory of that synthetic model, made once per session."""
    made = {}

    def get(key: str):
        if key not in made:
            preset, plants, overrides = CATALOGUE_MODELS[key]
            made[key] = make_model(tmp_path_factory.mktemp(key), preset, plants=Plants(**plants), overrides=overrides)
        return made[key]

    return get
