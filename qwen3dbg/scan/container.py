"""Container integrity of safetensors (single, sharded) and GGUF files, from the raw bytes."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from qwen3dbg.model.layout import INDEX, MAX_TENSORS, read_weight_map
from qwen3dbg.scan.findings import CheckpointFinding
from qwen3dbg.util.jsonio import JSONReadError, is_regular, loads, open_regular

# safetensors dtype -> (name the scan reports, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
#: the float spellings safetensors and GGUF share (F32, BF16, ...) -> the name the scan reports
FLOAT_NAMES = {k: ST_DTYPES[k][0] for k in ("F64", "F32", "F16", "BF16")}
ITEMSIZE = dict(ST_DTYPES.values())  # scan name -> bytes per element
#: integer types as the scan names them (safetensors) and as GGUF does: no Qwen3 weight is one
INTEGER_DTYPES = {
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "I64",
    "I32",
    "I16",
    "I8",
}
MAX_HEADER = 100 * 1024**2  # the safetensors library refuses larger headers
#: no shard's header reaches 1 MB; beyond this it is not a checkpoint's (10^6 entries once took 1.2 GB to parse)
ABSURD_HEADER = 16 * 1024**2
STACKED = "_exps.weight"  # GGUF tensors that stack a layer's experts, [experts, ...] in torch order
DAMAGED = "a loader fails on this file or reads bytes that are not the tensor's"


@dataclass(frozen=True)
class Entry:
    """One intact tensor: where its bytes are and how to read them."""

    name: str  # as stored in the file
    file: Path
    dtype: str  # torch-style name for safetensors ('bfloat16'), GGUF type name for GGUF ('Q8_0')
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    qtype: int | None = None  # GGUF type id; None for safetensors


def _err(check: str, message: str, tensor: str | None = None, why: str = DAMAGED, **numbers) -> CheckpointFinding:
    return CheckpointFinding("error", check, message, why, tensor, numbers)


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)


def _is_offsets(off) -> bool:
    return (
        isinstance(off, list)
        and len(off) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in off)
        and 0 <= off[0] <= off[1]
    )


def overlaps(entries: list[tuple[str, int, int]], file: str, check: str) -> list[CheckpointFinding]:
    """Errors for byte ranges (name, begin, end) that overlap another's."""
    out, prev = [], None
    for name, b, e in sorted(entries, key=lambda x: (x[1], x[2])):
        if prev is not None and b < prev[2] and e > b:
            out.append(
                _err(
                    check,
                    f"{name} (bytes {b}..{e}) overlaps {prev[0]} (bytes {prev[1]}..{prev[2]}) in {file}",
                    name,
                    begin=b,
                    end=e,
                    other=prev[0],
                )
            )
        if prev is None or e > prev[2]:
            prev = (name, b, e)
    return out


# Headers are parsed here, not by the safetensors library, so a damaged file becomes findings (header length,
# JSON, dtypes, offsets in bounds and not overlapping, index and shards complete) and the tensors that are intact
# are still scanned.
def read_safetensors(path: Path) -> tuple[list[Entry], list[CheckpointFinding]]:
    """The intact tensors of one safetensors file and findings for everything that is not."""
    findings: list[CheckpointFinding] = []
    try:
        f = open_regular(path)
    except OSError as e:
        return [], [_err("container", f"{path.name} cannot be read: {e.strerror or e}")]
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            return [], [
                _err("container", f"{path.name} has {size} bytes, fewer than the 8-byte header length", file_bytes=size)
            ]
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return [], [
                _err(
                    "container",
                    f"{path.name}: header length {n} runs past the end of the file ({size} bytes); "
                    "the file is truncated or not safetensors",
                    header_length=n,
                    file_bytes=size,
                )
            ]
        if n > MAX_HEADER:
            return [], [
                _err(
                    "container",
                    f"{path.name}: header length {n} is above safetensors' limit of {MAX_HEADER}",
                    header_length=n,
                )
            ]
        raw = f.read(n)
    if n > ABSURD_HEADER:
        return [], [
            _absurd(
                path, f"the header is {n} bytes, more than the {ABSURD_HEADER} of any checkpoint's", header_length=n
            )
        ]
    try:
        header = loads(raw, object_pairs_hook=_no_duplicates)
    except (JSONReadError, ValueError) as e:
        return [], [_err("container", f"{path.name}: the header cannot be used: {e}")]
    if not isinstance(header, dict):
        return [], [_err("container", f"{path.name}: the header is a JSON {type(header).__name__}, not an object")]
    if len(header) > MAX_TENSORS:
        return [], [
            _absurd(
                path,
                f"the header lists {len(header)} tensors, more than the {MAX_TENSORS} of any checkpoint",
                tensors=len(header),
            )
        ]
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        findings.append(
            _err(
                "container",
                f"{path.name}: __metadata__ is not a map of strings to strings",
                why="the safetensors library refuses such a header, so no loader reads the file",
            )
        )
    data_start, data_size = 8 + n, size - 8 - n
    entries, spans = [], []
    for name, info in header.items():
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("dtype"), str)
            or info["dtype"] not in ST_DTYPES
            or not _is_shape(info.get("shape"))
            or not _is_offsets(info.get("data_offsets"))
        ):
            findings.append(
                _err("container", f"{name}: malformed header entry {json.dumps(info)[:200]} in {path.name}", name)
            )
            continue
        dtype, itemsize = ST_DTYPES[info["dtype"]]
        shape, (b, e) = tuple(info["shape"]), info["data_offsets"]
        need = _numel(shape) * itemsize
        if e - b != need:
            findings.append(
                _err(
                    "container",
                    f"{name}: data_offsets span {e - b} bytes but {list(shape)} of {dtype} needs {need} in {path.name}",
                    name,
                    span=e - b,
                    needed=need,
                )
            )
            continue
        if e > data_size:
            findings.append(
                _err(
                    "container",
                    f"{name}: bytes {b}..{e} lie past the end of the data ({data_size} bytes) "
                    f"in {path.name}: the file is truncated or the header lies",
                    name,
                    end=e,
                    data_bytes=data_size,
                )
            )
            continue
        spans.append((name, b, e))
        entries.append(Entry(name, path, dtype, shape, data_start + b, need))
    bad = overlaps(spans, path.name, "container")
    findings += bad
    bad_names = {f.tensor for f in bad}
    covered = sum(e - b for _, b, e in spans)
    intact = not any(x.severity == "error" for x in findings)  # else the tensors lost explain any gap
    if intact and covered < data_size:
        findings.append(
            _err(
                "container",
                f"{path.name}: {data_size - covered} bytes of the data section belong to no tensor",
                why="the format forbids holes and the safetensors library refuses the "
                "file; a writer that left them may have dropped a tensor",
                unindexed_bytes=data_size - covered,
            )
        )
    if intact and covered == data_size:
        findings += _library_refusal(path)
    return [x for x in entries if x.name not in bad_names], findings


def _absurd(path: Path, what: str, **numbers) -> CheckpointFinding:
    return _err(
        "container",
        f"{path.name}: {what}; not scanned further",
        why="this is not a model checkpoint, or its header was generated wrong",
        **numbers,
    )


def _library_refusal(path: Path) -> list[CheckpointFinding]:
    """An error when the safetensors library refuses a file our own checks passed: what loaders use decides."""
    from safetensors import SafetensorError, safe_open

    try:
        safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        return [
            _err(
                "container",
                f"{path.name}: the safetensors library refuses the file ({e})",
                why="every loader reads safetensors through that library: none can load this file",
            )
        ]
    return []


def read_index(model_dir: Path) -> tuple[dict[str, str] | None, list[CheckpointFinding]]:
    """weight_map of a sharded checkpoint (tensor -> shard file name), or None with why it is unusable."""
    try:
        return read_weight_map(model_dir), []
    except (ValueError, OSError) as e:
        return None, [
            _err(
                "index",
                f"{INDEX} is not a valid index: {e}; scanning every *.safetensors file instead",
                why="transformers cannot load a sharded checkpoint without a valid index",
            )
        ]


def lost_tensors(findings: list[CheckpointFinding]) -> set[str]:
    """Tensors that exist but are reported unreadable, so the config check does not call them missing too."""
    return {n for f in findings if f.check in ("container", "index") for n in f.numbers.get("lost", [f.tensor]) if n}


def read_directory(model_dir: Path) -> tuple[list[Entry], list[CheckpointFinding], list[Path]]:
    """Every intact tensor of a safetensors model directory, with the index checked against the shards."""
    on_disk, findings = [], []
    for f in sorted(model_dir.glob("*.safetensors")):
        if is_regular(f):
            on_disk.append(f)
        else:
            findings.append(
                _err(
                    "container",
                    f"{f.name} is not a regular file (a directory, a FIFO, a device or a broken or looping link)",
                    f.name,
                    why="a loader that opens it fails or blocks",
                )
            )
    weight_map, bad_index = read_index(model_dir) if os.path.lexists(model_dir / INDEX) else (None, [])
    findings += bad_index
    if weight_map is None:
        files = on_disk
        if len(files) > 1 and not bad_index:
            findings.append(
                CheckpointFinding(
                    "warning",
                    "index",
                    f"{len(files)} safetensors files and no {INDEX}",
                    "transformers loads a multi-file checkpoint only through its index",
                )
            )
    else:
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not is_regular(f):
                lost = [t for t, s in weight_map.items() if s == f.name]
                findings.append(
                    _err(
                        "index",
                        f"shard {f.name} listed in {INDEX} is missing or not a regular file: its "
                        f"{len(lost)} tensors (e.g. {lost[0]}) cannot be read",
                        f.name,
                        why="loading the model fails",
                        lost=lost,
                    )
                )
        for f in on_disk:
            if f not in files:
                findings.append(
                    CheckpointFinding(
                        "warning",
                        "index",
                        f"{f.name} is not listed in {INDEX}",
                        "loaders never read it: a stale shard or a forgotten one",
                        f.name,
                    )
                )
        files = [f for f in files if is_regular(f)]
    entries: list[Entry] = []
    for f in files:
        got, bad = read_safetensors(f)
        entries += got
        findings += bad
        if weight_map is not None:
            held = {e.name for e in got} | {x.tensor for x in bad}
            for e in got:
                if weight_map.get(e.name) != f.name:
                    findings.append(
                        CheckpointFinding(
                            "warning",
                            "index",
                            f"{e.name} is in {f.name} but the index "
                            f"{'maps it to ' + weight_map[e.name] if e.name in weight_map else 'lacks it'}",
                            "loaders look for a tensor only where the index says",
                            e.name,
                        )
                    )
            for t, s in weight_map.items():
                if s == f.name and t not in held:
                    findings.append(
                        _err(
                            "index",
                            f"{t}: the index places it in {f.name}, which does not hold it",
                            t,
                            why="loading the model fails on this tensor",
                        )
                    )
    return entries, findings, files


def read_gguf_file(path: Path):
    """The intact tensors of a GGUF file, findings for the rest, and the parsed file (None if unreadable)."""
    import gguf

    from qwen3dbg.model.gguf_io import GGUFDamaged, data_region_problems, read_gguf

    try:
        g = read_gguf(path)
    except GGUFDamaged as e:
        return [], [_err("container", f"{path.name}: {e}")], None
    held = sum(t.shape[0] if t.name.endswith(STACKED) and t.shape else 1 for t in g.tensors)
    if held > MAX_TENSORS:  # stacked experts count one each: every one of them gets a name
        return (
            [],
            [
                _absurd(
                    path,
                    f"its tensor table holds {held} tensors (stacked experts counted one by one), "
                    f"more than the {MAX_TENSORS} of any checkpoint",
                    tensors=held,
                )
            ],
            g,
        )
    findings = [
        _err("container", f"{tensor or path.name}: {problem}", tensor, **numbers)
        for tensor, problem, numbers in data_region_problems(g)
    ]
    entries, spans = [], []
    for t in g.tensors:
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)][0] if t.nbytes is not None else 1
        if t.nbytes is None:
            findings.append(_err("container", f"{t.name}: unknown GGUF tensor type {t.qtype}", t.name))
        elif not t.shape or t.shape[-1] % block:
            findings.append(
                _err(
                    "container",
                    f"{t.name}: shape {list(t.shape)} does not split into {t.type_name} blocks of {block}",
                    t.name,
                )
            )
        elif 0 in t.shape:
            findings.append(
                _err(
                    "container",
                    f"{t.name}: shape {list(t.shape)} holds no values",
                    t.name,
                    why="no Qwen3 weight is empty: a loader finds nothing where the model needs weights",
                )
            )
        elif t.offset + t.nbytes > g.file_size:
            findings.append(
                _err(
                    "container",
                    f"{t.name}: bytes {t.offset}..{t.offset + t.nbytes} lie past the end of "
                    f"the file ({g.file_size} bytes): the file is truncated",
                    t.name,
                    end=t.offset + t.nbytes,
                    file_bytes=g.file_size,
                )
            )
        else:
            spans.append((t.name, t.offset, t.offset + t.nbytes))
            entries.append(Entry(t.name, path, t.type_name, t.shape, t.offset, t.nbytes, t.qtype))
    bad = overlaps(spans, path.name, "container")
    bad_names = {f.tensor for f in bad}
    return [e for e in entries if e.name not in bad_names], findings + bad, g
