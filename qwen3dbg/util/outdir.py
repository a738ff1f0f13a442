"""Output directories a command fills: a marker file of its own records what it wrote there, so a rerun
with `--replace` removes exactly that and never a file someone else put there (a real checkpoint's shards)."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from qwen3dbg.util.errors import UserError

MARKER = ".qwen3dbg-written.json"


def _recorded(path: Path, command: str) -> list[str] | None:
    """The files `command` recorded writing into `path`; None when it recorded nothing (no marker, another
    command's marker, or one that is not ours to read)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) and marker.get("command") == command else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and os.sep not in f for f in files):
        return None
    return files


def claim(path: Path, command: str, writes: tuple[str, ...], replace: bool) -> list[str]:
    """Check that `command` may write files named like the globs `writes` into directory `path`; return what
    its earlier run there recorded, which the caller removes (only with `replace`).

    Refused: a file it did not write whose name it would write (a checkpoint's config.json or shards, which
    the new files would overwrite or mix with), always; any other content unless `replace`, which keeps
    files it did not write and replaces only its own."""
    if not path.is_dir():
        return []
    held = sorted(p.name for p in path.iterdir() if not p.name.startswith(MARKER))
    ours = set(_recorded(path, command) or ())
    foreign = [n for n in held if n not in ours]
    clash = [n for n in foreign if any(fnmatch.fnmatchcase(n, w) for w in writes)]
    if clash:
        raise UserError(
            f"{path} holds {clash[0]}, which {command} did not write: it never overwrites or removes files it "
            "did not write; choose a new or empty directory"
        )
    if held and not replace:
        whose = f"files {command} did not write ({foreign[0]})" if foreign else f"what {command} wrote before"
        raise UserError(
            f"{path} holds {whose}: pass --replace to replace only what {command} wrote there, or choose a new or "
            "empty directory"
        )
    return sorted(ours & set(held))


def record(path: Path, command: str, files: list[str]) -> None:
    """Write the marker: `command` wrote `files` (names inside `path`). Written before the files, listing
    old and new, so a run that dies leaves every file it may have made on record."""
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"command": command, "files": sorted(set(files))}, indent=1))
    os.replace(tmp, path / MARKER)
