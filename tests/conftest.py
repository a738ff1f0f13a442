"""Shared fixtures: synthetic checkpoints made once per test session, and forced steps."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

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




# ---- catalogue models: tests/test_catalogue.py, tests/test_diagnosis.py, tests/test_diff_*.py --------

#: key -> (preset, Plants fields, config overrides): the tiny models the bug catalogue is tested on
CATALOGUE_MODELS = {
    "dense": ("tiny-dense", {}, None),
    "moe": ("tiny-moe", {}, None),
    "moe-nonorm": ("tiny-moe-nonorm", {}, None),
    "ghost-bias": ("tiny-dense", {"ghost_bias": 0.5}, None),
    # q/k norm weights large enough that layer-0 scores pass log(65504) = 11.09; k_norm ~100 as released
    "hot-qk": ("tiny-dense", {"q_norm_peak": 40.0, "k_norm_peak": 96.5}, None),
    # reductions long enough (512, 1024) that bf16 accumulation stands out of bf16's own noise
    "wide": ("tiny-dense", {}, {"hidden_size": 512, "intermediate_size": 1024}),
    # long-context bugs (tests/test_catalogue_long.py): a window in config.json with use_sliding_window
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


# --- scan-checkpoint / diff-weights / GGUF (issue 5) ------------------------------------------------

def rewrite_checkpoint(src, dst, edit):
    """Copy a model directory through `edit(tensors: dict) -> dict` into `dst` (one safetensors file)."""
    import shutil

    from safetensors.torch import save_file

    from qwen3dbg.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    tensors = edit({n: ckpt.get(n) for n in ckpt.keys()})
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def with_config(src, dst, **changes):
    """A copy of model directory `src` at `dst` whose config.json has `changes` (a value None removes the key)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return dst


def edit_safetensors_header(path, edit):
    """Rewrite a safetensors file's JSON header through `edit(header: dict) -> dict`, data bytes unchanged."""
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


# ---- external candidates: tests/test_ext_*.py ------------------------------------------------------

def first_divergence(model, cand: str, dtype: str | None = None) -> str | None:
    """'step N: tap' where `qwen3dbg diff --ref hf --cand CAND` first finds a divergence on PROMPT + DECODE,
    or None when the candidate agrees (a store: side brings its own ids)."""
    from qwen3dbg.diff import run_diff

    ids = {} if cand.startswith("store:") else {"token_ids": PROMPT, "decode_ids": DECODE}
    div = run_diff("hf", cand, model_dir=model, dtype=dtype, **ids).first_divergence
    return None if div is None else f"step {div.step}: {div.tap}"


def cli(*args):
    """Run the CLI like the console script does (UserError -> one line, exit 2)."""
    import sys

    from qwen3dbg.cli import main

    argv, sys.argv = sys.argv, ["qwen3dbg", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


# ---- adversarial inputs: tests/test_adversarial_*.py ----------------------------------------------

@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: opening a FIFO for reading, for one, waits for a writer forever."""
    import signal

    def expire(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def peak_traced_bytes(fn, *args):
    """(fn(*args), the peak of Python and numpy allocations while it ran)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return fn(*args), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
