"""JSON in and out: what we are given (headers, indexes, configs, manifests) read with bounded depth, time
and memory; what we write made strict (no NaN or inf, no lone surrogates)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from itertools import accumulate
from pathlib import Path
from typing import Callable

from qwen3dbg.util.errors import UserError
from qwen3dbg.util.text import utf8_text


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, str):
        return utf8_text(x)
    if isinstance(x, dict):
        return {utf8_text(str(k)): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


#: no JSON we read nests deeper than a handful of levels; far below the interpreter's recursion limit
MAX_DEPTH = 64
#: a config, index or manifest of any real checkpoint or store is far smaller
MAX_FILE_BYTES = 256 * 1024**2

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_STRING = re.compile(rb'"[^"]*"')
_OTHER = bytes(range(256)).translate(None, b'"[]{}')
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


class JSONReadError(ValueError):
    """Not JSON we can use; the message says why in one sentence, without the path (callers add it)."""


def open_regular(path: str | Path):
    """Open `path` for binary reading only if it is a regular file: a FIFO, device or directory is
    refused without blocking (O_NONBLOCK), and a symlink loop is an OSError like any unreadable path."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise OSError(f"{path} is a {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path: str | Path) -> bool:
    """Whether `path` is a regular file, following symlinks; a loop or a dangling link is not one."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, in a few linear passes of C loops (brackets
    inside strings do not count; for text that is not JSON the count is exact up to its first error)."""
    # Escapes first: only \\ and \" can hide a quote. Then keep quotes and brackets only; a pair of
    # adjacent quotes encloses no bracket either way (an empty string, or the gap between two strings).
    skeleton = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _OTHER).replace(b'""', b"")
    brackets = _STRING.sub(b"", skeleton).translate(_STEP)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


def _lone_surrogate(x) -> bool:
    """Whether any string (key or value) in a parsed document holds half of a UTF-16 pair."""
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return False


def loads(data: bytes | str, max_depth: int = MAX_DEPTH, **kwargs):
    """`json.loads` for untrusted input: UTF-8 only, at most `max_depth` levels, strings that are valid
    Unicode (a lone surrogate escape breaks every writer downstream). `kwargs` go to json.loads."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        data = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONReadError(f"it is not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r})") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JSONReadError(
            f"it nests arrays or objects {depth} levels deep, more than the {max_depth} any valid file needs"
        )
    try:
        value = json.loads(data, **kwargs)
    except json.JSONDecodeError as e:
        raise JSONReadError(f"it is not valid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(data) and _lone_surrogate(value):
        raise JSONReadError("it holds a lone UTF-16 surrogate escape (\\ud800-\\udfff unpaired), which is not text")
    return value


def read_json(path: str | Path, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH, **kwargs):
    """Parse the JSON file at `path` with `loads`' bounds; OSError when it cannot be read or is not a
    regular file, JSONReadError when it is too large or not usable JSON."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise JSONReadError(f"it is {size} bytes, more than the {max_bytes} a file of this kind can need")
        data = f.read(size + 1)  # not max_bytes: read(n) allocates n bytes up front
    if len(data) > max_bytes:  # it grew while we read it
        raise JSONReadError(f"it is more than the {max_bytes} bytes a file of this kind can need")
    return loads(data, max_depth, **kwargs)


def read_given_json(path: str | Path, missing: str, unusable: Callable[[str], str]):
    """`read_json` of a file the user pointed us to, every failure a UserError: `missing` when there is no
    such file, `unusable(why)` when it is not usable JSON, else why it cannot be read."""
    if not os.path.lexists(path):
        raise UserError(missing)
    try:
        return read_json(path)
    except JSONReadError as e:
        raise UserError(unusable(str(e))) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
