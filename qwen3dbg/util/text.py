"""Text we print and write: user and file text made safe for each writer (UTF-8 files cannot hold a lone
surrogate; in rich markup `[` and `\\` mean something), and small helpers for the sentences the commands print."""

from __future__ import annotations

import re

#: rich's own tag pattern (rich.markup.RE_TAGS) with its backslashes, or any other `[` with its backslashes
_BRACKET = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])|(\\*)\[")
_TRAILING = re.compile(r"(\\+)$")


def utf8_text(s: str) -> str:
    """`s` with each lone surrogate written as `\\udcff`: a non-UTF-8 file name or a `\\ud800` escape in a
    file's JSON gives one, and no UTF-8 writer (JSON, HTML) can encode it."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def escape(s: str) -> str:
    """`s` as rich markup that prints exactly `s`, even next to markup of ours (`f"[b]{escape(s)}[/]"`).

    rich.markup.escape drops a backslash before a `[` that opens no tag (rich reads `\\[` as `[` there)
    and keeps a trailing `\\\\` that then escapes the tag after it. Rich prints n backslashes before a tag
    from 2n + 1 (the tag escaped) and before any other `[` from n + 1; trailing ones are doubled, so that
    a tag of ours that follows stays a tag (and at the very end of a line, print them doubled)."""

    def one(m: re.Match) -> str:
        if m.group(2) is not None:
            return m.group(1) * 2 + "\\" + m.group(2)
        return m.group(3) + "\\["

    return _TRAILING.sub(lambda m: m.group(1) * 2, _BRACKET.sub(one, s))


def plural(n: int, noun: str) -> str:
    """`1 decode step`, `2 decode steps`, `0 decode steps`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def short(x: float, digits: int = 2) -> str:
    """A number in `digits` significant digits and as few characters as that allows: 1.5e30, 2.5e-30, 0.0031."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:.{digits}g}")
