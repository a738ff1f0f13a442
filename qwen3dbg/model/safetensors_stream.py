"""A safetensors file written one tensor at a time, without holding the others in memory."""

from __future__ import annotations

import json
import struct
from collections import deque
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# Device-to-host copies in flight before the writer waits for the oldest: enough to cover a decode
# step's taps, little enough to stay a small share of pinned memory.
MAX_PENDING_BYTES = 256 << 20


# The header's room is reserved from the planned names and shapes before any data is written (the widest dtype
# name, 20-digit offsets), tensors are appended as they come, and the real header is written last, padded with
# spaces as the safetensors format allows. A tensor on a GPU is not waited for: it is copied into pinned host
# memory on the current stream and written once that copy is done, so an engine emitting taps keeps its stream
# busy (a tap's data offset is where it lands in the file; readers go by the header, not by the plan's order).
class StreamingWriter:
    def __init__(self, path: str | Path, plan: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None):
        self.path, self.plan = Path(path), dict(plan)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.header: dict[str, dict] = {}
        self.offset = 0
        self.seen: set[str] = set()
        self.pending: deque[tuple[str, torch.Tensor, torch.cuda.Event]] = deque()  # oldest first
        self.pending_bytes = 0
        worst = {n: {"dtype": "BOOL", "shape": list(s), "data_offsets": [10**19, 10**19]} for n, s in self.plan.items()}
        worst["__metadata__"] = self.metadata
        reserve = len(json.dumps(worst, separators=(",", ":"))) + 64
        self.reserve = reserve + (-(8 + reserve) % 8)  # data starts 8-byte aligned
        self.f = open(self.path, "wb")
        self.f.seek(8 + self.reserve)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (its value now, in stream order where it lives on a GPU)."""
        assert name in self.plan, f"tensor {name} is not in this file's plan"
        assert name not in self.seen, f"tensor {name} written twice"
        assert tuple(tensor.shape) == tuple(self.plan[name]), (
            f"{name}: shape {tuple(tensor.shape)} != {self.plan[name]}"
        )
        self.seen.add(name)
        tensor = tensor.detach()
        if not tensor.is_cuda:
            self._append(name, tensor.to("cpu").contiguous())
            return
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensor.device))
        self.pending.append((name, host, done))
        self.pending_bytes += host.nbytes
        self._drain(MAX_PENDING_BYTES)

    def _drain(self, keep_bytes: int) -> None:
        """Append finished copies in order, waiting for the oldest while more than `keep_bytes` are in flight."""
        while self.pending:
            name, host, done = self.pending[0]
            if self.pending_bytes > keep_bytes:
                done.synchronize()
            elif not done.query():
                return
            self.pending.popleft()
            self.pending_bytes -= host.nbytes
            self._append(name, host)

    def _append(self, name: str, t: torch.Tensor) -> None:
        if t.numel():
            self.f.write(t.reshape(-1).view(torch.uint8).numpy())
        n = t.numel() * t.element_size()
        self.header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + n],
        }
        self.offset += n

    def close(self) -> list[str]:
        """Write the header and close; return the planned names that were never written."""
        self._drain(-1)
        blob = json.dumps({**self.header, "__metadata__": self.metadata}, separators=(",", ":")).encode()
        assert len(blob) <= self.reserve
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.reserve) + blob + b" " * (self.reserve - len(blob)))
        self.f.close()
        return [n for n in self.plan if n not in self.header]

    def abort(self) -> None:
        self.f.close()
