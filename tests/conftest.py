"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# ---- catalogue models: tests/test_catalogue.py, tests/test_diagnosis.py ----------------------------

#: key -> (preset, Plants fields, config overrides): the tiny models the bug catalogue is tested on
CATALOGUE_MODELS = {
    "dense": ("tiny-dense", {}, None),
    "moe": ("tiny-moe", {}, None),
    "moe-nonorm": ("tiny-moe-nonorm", {}, None),
    "ghost-bias": ("tiny-dense", {"ghost_bias": 0.5}, None),
    # q/k norm weights large enough that layer-0 scores pass log(65504) = 11.09; k_norm ~100 as released
    "hot-qk": ("tiny-dense", {"q_norm_peak": 40.0, "k_norm_peak": 96.5}, None),
    # a reduction long enough (512) that bf16 accumulation stands out of bf16's own noise
    "wide": ("tiny-dense", {}, {"hidden_size": 512}),
}


@pytest.fixture(scope="session")
def catalogue_model(tmp_path_factory):
    """catalogue_model(key) -> directory of that synthetic model, made once per session."""
    from qwen3dbg.synth import Plants, make_model

    made = {}

    def get(key: str):
        if key not in made:
            preset, plants, overrides = CATALOGUE_MODELS[key]
            made[key] = make_model(tmp_path_factory.mktemp(key), preset, plants=Plants(**plants), overrides=overrides)
        return made[key]

    return get


# ---- differ: a fresh run cache per session, never the user's ~/.cache -------------------------------

@pytest.fixture(scope="session", autouse=True)
def _qwen3dbg_home(tmp_path_factory):
    """The differ caches reference runs under $QWEN3DBG_HOME; tests get their own, shared by the session."""
    import os

    old = os.environ.get("QWEN3DBG_HOME")
    os.environ["QWEN3DBG_HOME"] = str(tmp_path_factory.mktemp("qwen3dbg-home"))
    yield
    if old is None:
        del os.environ["QWEN3DBG_HOME"]
    else:
        os.environ["QWEN3DBG_HOME"] = old
