"""Shared fixtures: synthetic checkpoints made once per test session, and forced steps."""

from __future__ import annotations

import os

import pytest
import torch

from qwen3dbg.capture import capture, forced_steps
from qwen3dbg.dtypes import ulp
from qwen3dbg.reference.qwen3 import Qwen3Reference
from qwen3dbg.store import TapStore, masked
from qwen3dbg.synth import Plants, make_model
from qwen3dbg.taps import forward_index

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


# ---- external candidates (issue 7): the noise-floor check of a whole tap store ----------------------
# A candidate's tap is clean when its error against the fp64 golden is within a few times the error our
# own reference makes in the same dtype (the flash-attention rule), plus a few ulps of the tap's scale
# for taps the reference happens to get exact.

# An independent implementation sums in another order: allow a few times the reference's own error.
FLOOR_FACTOR = 4.0
ULPS_OF_SCALE = 8.0


def reference_stores(model_dir, steps, dtype, tmp_path) -> tuple[TapStore, TapStore]:
    """(fp64 golden, our reference in `dtype`) captured on exactly these steps."""
    out = []
    for name, dt in (("golden", "float64"), ("ref", dtype)):
        capture(Qwen3Reference(model_dir, dt), steps, tmp_path / name)
        out.append(TapStore.open(tmp_path / name))
    return out[0], out[1]


def _error(a: torch.Tensor, gold: torch.Tensor) -> float:
    """Max |a - gold| over the entries the golden does not mask (attention's -inf)."""
    keep = ~masked(gold)
    return (a.double() - gold)[keep].abs().max().item() if keep.any() else 0.0


def _scale(gold: torch.Tensor) -> float:
    keep = ~masked(gold)
    return gold[keep].abs().max().item() if keep.any() else 0.0


def divergent_taps(cand: TapStore, golden: TapStore, ref: TapStore, config) -> list[tuple[int, str, float, float]]:
    """(step, tap, error, allowance) for every tap beyond the noise floor, in step then forward order.
    A tap's floor is measured over all steps, since one decode token alone can be exact by luck."""
    order, eps = forward_index(config), ulp(cand.dtype)
    steps = [info.step for info in golden.steps]
    allowed: dict[str, float] = {}
    for step in steps:
        for name in cand.names(step):
            g = golden.get(step, name)
            if g.is_floating_point():
                g = g.double()
                floor = FLOOR_FACTOR * _error(ref.get(step, name), g) + ULPS_OF_SCALE * eps * _scale(g)
                allowed[name] = max(allowed.get(name, 0.0), floor)
    found = []
    for step in steps:
        for name in sorted(cand.names(step), key=order.__getitem__):
            c, g = cand.get(step, name), golden.get(step, name)
            assert c.shape == g.shape, f"{name}: shape {tuple(c.shape)} != {tuple(g.shape)}"
            if not g.is_floating_point():
                if not torch.equal(c.long(), g.long()):
                    found.append((step, name, float("inf"), 0.0))
            elif not torch.equal(masked(c.double()), masked(g)):
                found.append((step, name, float("inf"), 0.0))
            elif (err := _error(c, g)) > allowed[name]:
                found.append((step, name, err, allowed[name]))
    return found
