"""Lazy reading of safetensors checkpoints, single-file or sharded, in their on-disk tensor names: nothing is
unpickled, and a tensor is memory-mapped from its shard only when `get` asks, so 60 GB cost what one tensor costs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.layout import INDEX, SINGLE, Held, count_problems, read_weight_map, tensor_shapes
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.jsonio import is_regular

SAMPLE_BYTES = 64 * 1024  # of each file's data at each end, in a digest
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        index = self.dir / INDEX
        if os.path.lexists(index):
            try:
                weight_map = read_weight_map(self.dir)
            except (ValueError, OSError) as e:
                raise UserError(f"{index} is not a usable safetensors index: {e}") from None
            self.file_of = {name: self.dir / f for name, f in weight_map.items()}
            for f in sorted(set(self.file_of.values())):
                if not is_regular(f):
                    raise UserError(
                        f"shard {f.name} listed in {INDEX} is missing from {self.dir} or is not a regular file"
                    )
        elif is_regular(self.dir / SINGLE):
            self.file_of = {name: self.dir / SINGLE for name in self._open(self.dir / SINGLE).keys()}
        elif os.path.lexists(self.dir / SINGLE):
            raise UserError(f"{self.dir / SINGLE} is not a regular file (a directory, a FIFO or a broken link)")
        else:
            raise UserError(f"no {SINGLE} or {INDEX} in {self.dir}")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"cannot read {path} as safetensors: {e}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def numel(self) -> int:
        """How many weights the checkpoint holds, from the headers alone."""
        return sum(torch.Size(self.shape(n)).numel() for n in self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype name (F32, BF16, I64, ...)."""
        return self._slice(name).get_dtype()

    def _slice(self, name: str):
        try:
            return self._open(self.file_of[name]).get_slice(name)
        except SafetensorError as e:
            raise UserError(
                f"{self.file_of[name].name} does not hold {name}, which {INDEX} places there ({e})"
            ) from None

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.file_of:
            raise UserError(f"checkpoint {self.dir} has no tensor {name!r}")
        try:
            t = self._open(self.file_of[name]).get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"cannot read {name} from {self.file_of[name].name}: {e}") from None
        return t if dtype is None else t.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read alone: a vocabulary's lm_head need not be read whole."""
        t = self._open(self.file_of[name]).get_slice(name)[start:stop]
        return t if dtype is None else t.to(dtype)

    def digest(self) -> str:
        """A fingerprint of the weights that costs the same at any size: each file's header (names, dtypes,
        shapes, offsets) and the first and last 64 KiB of its data. Another seed, dtype or training run
        changes it; one edited value deep inside a tensor may not."""
        h = hashlib.sha256()
        for path in sorted(set(self.file_of.values())):
            with open(path, "rb") as f:
                size = path.stat().st_size
                header = 8 + int.from_bytes(f.read(8), "little")
                h.update(f.read(min(header - 8 + SAMPLE_BYTES, size - 8)))
                f.seek(max(header, size - SAMPLE_BYTES))
                h.update(f.read())
        return h.hexdigest()[:16]

    def check_layout(self, cfg: Qwen3Config) -> None:
        """Refuse a checkpoint that lacks a tensor `cfg` implies, or holds one in another shape: an
        implementation would otherwise fail deep inside its first matmul, read values in the wrong
        layout, or (transformers) fill the missing weights with random values and run on."""
        scan = f"run `qwen3dbg scan-checkpoint {self.dir}` for every mismatch"
        if problems := count_problems(cfg, Held.of(self.file_of)):
            raise UserError(f"{self.dir}: its {problems[0][1]}: {scan}")
        expected = tensor_shapes(cfg)
        missing = [name for name in expected if name not in self]
        if missing:
            raise UserError(
                f"{self.dir} lacks {len(missing)} tensor(s) its config.json implies, {missing[0]} first: {scan}"
            )
        for name, want in expected.items():
            if (have := self.shape(name)) != want:
                raise UserError(
                    f"{name} in {self.dir} has shape {list(have)} but its config.json implies {list(want)}: {scan}"
                )
            if (dtype := self.dtype(name)) not in FLOAT_DTYPES:
                raise UserError(f"{name} in {self.dir} is {dtype}, not floating point: weights must be; {scan}")
