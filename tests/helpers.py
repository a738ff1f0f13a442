"""Shared test helpers that are not fixtures (those live in conftest.py): the forced prompt, checkpoint
rewriting, running the CLI in-process, deadlines and memory peaks. Tests import them `from helpers import ...`;
pytest puts tests/ on sys.path for the rootdir's conftest."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

PROMPT = [5, 17, 99, 250, 3, 411, 8]
DECODE = [42, 300, 7]


# --- scan-checkpoint / diff-weights / GGUF (issue 5) ------------------------------------------------


def rewrite_checkpoint(src, dst, edit):
    """Copy a model directory through `edit(tensors: dict) -> dict` into `dst` (one safetensors file)."""
    import shutil

    from safetensors.torch import save_file

    from qwen3dbg.model.checkpoint import Checkpoint

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
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


# ---- external candidates: tests/candidates/test_ext_*.py ------------------------------------------------------


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


# ---- adversarial inputs: tests/*/test_adversarial_*.py ----------------------------------------------


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


def released_checkpoint(d: Path) -> Path:
    """A real-looking sharded checkpoint nobody made with make-model here: one shard per tensor (dozens) with an
    index, a tokenizer and a generation config beside them."""
    from qwen3dbg.model.layout import INDEX
    from qwen3dbg.model.synth import make_model
    from qwen3dbg.util.outdir import MARKER

    make_model(d, "tiny-dense", shard_bytes=0)
    (d / MARKER).unlink()
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")
    assert len(list(d.glob("model-*.safetensors"))) > 30 and (d / INDEX).exists()
    return d
