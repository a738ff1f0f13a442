"""Taps between processes over a socket: one message with what the reader needs to place the tap and how its
tensors are laid out, then each tensor's bytes, written from the tensor and read into one of the reader's own
(one copy each way: `Connection.recv_bytes_into` went through a buffer and copied each tap three times, so a
prefill's 11 GB of HF taps cost more than the prefill itself). A send blocks while the reader has not taken
what came before, beyond the kernel's socket buffer: a channel is bounded by its reader."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Callable

import torch

from qwen3dbg.diff.streams import CacheSlots, QueryRows


#: bytes the kernel holds in each direction: a large tap then passes in chunks of this size (at the default of
#: 208 KB, 1.3 GB/s between two processes here; at 4 MB, 2.2)
SOCKET_BUFFER = 4 << 20


class Wire:
    """One end of a connection carrying taps: messages (pickled, through the `Connection`) and raw tensor
    bytes (through the same socket, which the `Connection` reads no further ahead than each message)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # the system's cap applies (net.core.wmem_max)
            self._sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)

    def send(self, message) -> None:
        self.conn.send(message)

    def recv(self):
        return self.conn.recv()

    def send_head(self, head: tuple) -> None:
        """A message with no tensor after it."""
        self.conn.send((head, None, None, []))

    def send_tap(self, head: tuple, value) -> None:
        """`head` (a tuple of plain values) and `value`: a tensor, the query rows a side computed, or the cache
        slots a step wrote (with the whole cache after it, where the side has it)."""
        tensors, kind, positions = [value], "tensor", None
        if isinstance(value, QueryRows):
            tensors, kind, positions = [value.values], "rows", value.positions
        elif isinstance(value, CacheSlots):
            kind, positions = "slots", value.positions
            tensors = [value.values] if value.full is None else [value.values, value.full]
        tensors = [t.contiguous() for t in tensors]
        self.conn.send(
            (head, kind, positions, [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors])
        )
        for t in tensors:
            self._sock.sendall(_bytes(t))

    def recv_head(self) -> tuple:
        """The next message: (head, layout), layout being what `recv_tensors` reads after it."""
        head, *layout = self.conn.recv()
        return head, layout

    def recv_tensors(self, layout: list) -> tuple[torch.Tensor, Callable[[torch.Tensor], object]]:
        """The tap's first tensor, read into memory of its own, and what makes the value sent of it (a tensor,
        query rows, cache slots) from that tensor or from another holding the same (a gathered one)."""
        kind, positions, shapes = layout
        tensors = []
        for dtype, shape in shapes:
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            view = _bytes(t)
            while view.nbytes:
                n = self._sock.recv_into(view)
                if n == 0:
                    raise EOFError("the sender closed its end within a tap")
                view = view[n:]
            tensors.append(t)
        if kind == "rows":
            return tensors[0], lambda t: QueryRows(t, positions)
        if kind == "slots":
            full = tensors[1] if len(tensors) > 1 else None
            return tensors[0], lambda t: CacheSlots(t, positions, full)
        return tensors[0], lambda t: t

    def close(self) -> None:
        self._sock.close()
        self.conn.close()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
