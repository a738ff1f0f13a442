"""The terminal view of `qwen3dbg cache`: the entries listed (or removed), least recently used first."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from qwen3dbg.util.home import Entry, budget, home


def render(found: list[Entry], cleared: bool, console: Console) -> None:
    table = Table(title=f"{'removed from' if cleared else 'cached in'} {home()}", title_justify="left")
    for col in ("kind", "size", "last used", "path"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    now = time.time()
    for e in found:
        table.add_row(e.kind, f"{e.size / 1e6:,.1f} MB", f"{(now - e.last_used) / 3600:,.1f} h ago", e.path.name)
    console.print(table, markup=False)
    total = sum(e.size for e in found)
    console.print(
        f"{len(found)} entries, {total / 1e9:.2f} GB; budget {budget() / 1e9:.2f} GB (QWEN3DBG_CACHE_BUDGET)",
        markup=False,
        highlight=False,
    )
