"""A checkpoint opened for scanning or diffing: its intact tensors, its config, and reading them.

PATH is a model directory (config.json + safetensors, single or sharded), one `.safetensors` file, or
one `.gguf` file. Files are memory-mapped once; a tensor is read in windows whose pages are handed
back as soon as they are summed, so memory stays near one window whatever the checkpoint's size.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

from qwen3dbg.model.config import Qwen3Config, load_config
from qwen3dbg.model.layout import INDEX
from qwen3dbg.scan.container import (
    FLOAT_NAMES,
    INTEGER_DTYPES,
    ITEMSIZE,
    STACKED,
    Entry,
    read_directory,
    read_gguf_file,
    read_safetensors,
)
from qwen3dbg.scan.findings import CheckpointFinding
from qwen3dbg.scan.stats import DTYPE_CODES, Accumulator, Stats, chunk_elements
from qwen3dbg.tapstore.schema import MANIFEST
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.jsonio import open_regular

WINDOW_BYTES = 64 * 1024**2


@dataclass
class CheckpointSource:
    path: Path
    format: str  # safetensors | gguf
    files: list[Path]
    entries: list[Entry]
    findings: list[CheckpointFinding]
    cfg: Qwen3Config | None
    _maps: dict = field(default_factory=dict, repr=False)

    def hf_names(self, entry: Entry) -> list[str]:
        """The HF tensor names an entry holds: itself, or for GGUF its mapped name(s) (one per stacked expert)."""
        if self.format == "safetensors":
            return [entry.name]
        from qwen3dbg.model.gguf_names import gguf_to_hf

        return gguf_to_hf(entry.name, entry.shape[0] if entry.name.endswith(STACKED) else 0)

    def _bytes(self, path: Path) -> tuple[mmap.mmap, np.ndarray]:
        if path not in self._maps:
            with open_regular(path) as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8))
        return self._maps[path]

    def _release(self, path: Path, begin: int, end: int) -> None:
        """Drop our mapping of these bytes (the page cache keeps them), so RSS does not grow with the file."""
        mm, _ = self._maps[path]
        lo = begin - begin % mmap.PAGESIZE
        if end > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)

    def stats(self, e: Entry) -> Stats | None:
        """One fused pass over the tensor's values; None for types without values to summarize (ints)."""
        dtype = FLOAT_NAMES.get(e.dtype, e.dtype) if e.qtype is not None else e.dtype
        _, buf = self._bytes(e.file)
        if dtype in DTYPE_CODES:
            size = ITEMSIZE[dtype]
            acc = Accumulator(dtype, buf[e.offset : e.offset + size])
            step = max(1, WINDOW_BYTES // (chunk_elements() * size)) * chunk_elements()
            n = e.nbytes // size
            for start in range(0, n, step):
                m = min(step, n - start)
                begin = e.offset + start * size
                if (buf.ctypes.data + begin) % size:  # the format allows odd offsets; the kernel wants aligned
                    window = np.frombuffer(buf[begin : begin + m * size].tobytes(), dtype=np.uint8)
                    acc.add(window.ctypes.data, m)
                else:
                    acc.add(buf.ctypes.data + begin, m)
                self._release(e.file, begin, begin + m * size)
            return acc.result()
        if e.qtype is None or e.dtype in INTEGER_DTYPES:
            return None
        try:
            return self._quantized_stats(e, buf)
        except NotImplementedError:  # a block format gguf-py cannot expand
            return None

    def _quantized_stats(self, e: Entry, buf: np.ndarray) -> Stats:
        from qwen3dbg.model.gguf_io import dequantize

        cols, rows = e.shape[-1], int(np.prod(e.shape[:-1], dtype=np.int64))
        row_bytes = e.nbytes // rows if rows else 0
        unit = chunk_elements() // gcd(chunk_elements(), cols)  # rows per whole number of chunks
        per = max(1, WINDOW_BYTES // 4 // (unit * cols)) * unit
        acc = None
        for r in range(0, rows, per):
            k = min(per, rows - r)
            begin = e.offset + r * row_bytes
            vals = np.ascontiguousarray(dequantize(buf[begin : begin + k * row_bytes], e.qtype, (k, cols)))
            acc = acc or Accumulator("float32", vals.reshape(-1)[:1])
            acc.add(vals.ctypes.data, vals.size)
            self._release(e.file, begin, begin + k * row_bytes)
        return (acc or Accumulator("float32", np.empty(0, np.float32))).result()

    def array(self, e: Entry) -> np.ndarray:
        """The tensor as float32 in torch order (a copy; quantized types dequantized)."""
        from qwen3dbg.model.gguf_io import GGUF_TYPES, dequantize

        _, buf = self._bytes(e.file)
        raw = buf[e.offset : e.offset + e.nbytes]
        if e.qtype is not None:
            try:
                vals = dequantize(raw, e.qtype, e.shape)
            except NotImplementedError:
                raise UserError(f"{e.name} is {e.dtype}, which diff-weights cannot read as floats") from None
            return vals.copy() if np.may_share_memory(vals, raw) else vals
        if e.dtype == "bfloat16":
            return dequantize(raw, GGUF_TYPES["bf16"], e.shape)
        if e.dtype not in DTYPE_CODES:
            raise UserError(f"{e.name} is {e.dtype}: diff-weights compares float tensors only")
        return raw.view(e.dtype).astype(np.float32).reshape(e.shape)

    def same_bytes(self, a: Entry, b: Entry) -> bool:
        _, buf = self._bytes(a.file)
        _, buf_b = self._bytes(b.file)
        return a.nbytes == b.nbytes and np.array_equal(
            buf[a.offset : a.offset + a.nbytes], buf_b[b.offset : b.offset + b.nbytes]
        )

    def close(self) -> None:
        """Unmap every file. Only copies leave this class, so no array over a map outlives it; a map that
        is still exported here is a leak (BufferError), found by the tests."""
        for path in list(self._maps):
            mm, view = self._maps.pop(path)
            del view  # the map cannot close while an array exports it
            mm.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            _drop_locals(exc)
        self.close()


def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of the finished frames an exception (and those it was raised from) carries: a
    damaged tensor fails mid-read, and its frames hold views of the map (`buf`, `raw`, gguf-py's blocks)
    that would keep `close()` from unmapping it and turn the one-sentence error into a BufferError."""
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # frames still running (the `with` body's) are skipped
        exc = exc.__cause__ or exc.__context__


def _config(model_dir: Path) -> tuple[Qwen3Config | None, list[CheckpointFinding]]:
    if not os.path.lexists(model_dir / "config.json"):
        return None, [
            CheckpointFinding(
                "warning",
                "config",
                f"no config.json in {model_dir}: tensors are not checked against a config",
                "missing, unexpected or misshapen tensors go unnoticed",
            )
        ]
    try:
        return load_config(model_dir), []
    except UserError as e:
        return None, [
            CheckpointFinding(
                "error",
                "config",
                f"config.json cannot be used: {e}",
                "loaders fail on it; tensors are not checked against a config",
            )
        ]


def open_source(path: str | Path) -> CheckpointSource:
    """Open PATH as a checkpoint; UserError when it is not one at all (the CLI's exit 2)."""
    path = Path(path)
    if not path.exists():
        what = "is a link that leads nowhere (dangling, or a loop)" if path.is_symlink() else "does not exist"
        raise UserError(f"{path} {what}: pass a model directory, a .safetensors file or a .gguf file")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            raise UserError(
                f"{path} is a tap store, not a checkpoint: its -inf values are attention masks, not "
                f"broken weights; check it with `qwen3dbg validate-store {path}`"
            )
        if not any(path.glob("*.safetensors")) and not os.path.lexists(path / INDEX):
            raise UserError(
                f"{path} holds no safetensors files: pass a model directory, a .safetensors or a .gguf file"
            )
        cfg, findings = _config(path)
        entries, more, files = read_directory(path)
        return CheckpointSource(path, "safetensors", files, entries, findings + more, cfg)
    try:
        with open_regular(path) as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if magic == b"GGUF" or path.suffix == ".gguf":
        entries, findings, g = read_gguf_file(path)
        cfg = None
        if g is not None:
            from qwen3dbg.model.gguf_io import GGUFDamaged, config_from_gguf

            try:
                cfg = config_from_gguf(g)
            except GGUFDamaged as e:
                findings.append(
                    CheckpointFinding(
                        "error",
                        "config",
                        f"the GGUF metadata does not describe a Qwen3 model: {e}",
                        "llama.cpp cannot load it; tensors are not checked against a config",
                    )
                )
        return CheckpointSource(path, "gguf", [path], entries, findings, cfg)
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is neither a model directory, a .safetensors file nor a .gguf file")
    entries, findings = read_safetensors(path)
    findings.append(
        CheckpointFinding(
            "info",
            "config",
            "a single safetensors file is checked without a config: pass its "
            "directory to check names and shapes against config.json",
            "-",
        )
    )
    return CheckpointSource(path, "safetensors", [path], entries, findings, None)
