"""The terminal view of a DiffResult (rich): a one-screen summary first, then a compact per-layer table."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from qwen3dbg.diff.result import DiffResult, TapResult
from qwen3dbg.text import escape


_STYLE = {"first divergence": "bold", "origin": "bold", "first NaN/inf": "bold red", "golden NaN/inf": "bold red",
          "reference": "bold yellow", "diagnosis": "bold cyan", "or": "cyan", "within noise": "bold blue",
          "routing ties": "yellow", "not compared": "dim", "note": "yellow", "decode steps": "bold",
          "systematic": "bold yellow"}


def summary(result: DiffResult) -> Panel:
    """Verdict, sides, first divergence with its origin, diagnosis, in-noise finding."""
    bad = result.exit_code != 0
    lines = []
    for label, text in result.summary():
        if label == "verdict":
            lines.append(f"[bold {'red' if bad else 'green'}]{escape(text)}[/]")
        elif label == "sides":
            lines.append(f"[dim]{escape(text)}[/]")
        else:
            lines.append(f"[{_STYLE[label]}]{label}[/] {escape(text)}")
    return Panel("\n".join(lines), title="qwen3dbg diff", border_style="red" if bad else "green", expand=False)


def layer_table(result: DiffResult) -> Table:
    """One row per layer (plus the ops outside layers): its worst tap over all steps."""
    t = Table(title="worst tap per layer (- : embed, final_norm, logits); excess = error / tolerance, > 1 is divergent",
              title_justify="left")
    for col, just in (("layer", "left"), ("worst tap", "left"), ("step", "right"), ("excess", "right"),
                      ("rel. L2", "right"), ("ref rel. L2", "right"), ("max |err|", "right"), ("", "left")):
        t.add_column(col, justify=just)
    groups: dict[str, list[TapResult]] = {}
    for r in result.taps:
        key = "-" if r.layer is None else str(r.layer)
        groups.setdefault(key, []).append(r)
    first = result.first_divergence
    for key, rows in groups.items():
        rows = [r for r in rows if r.status != "not_compared"]
        if not rows:
            continue
        w = max(rows, key=lambda r: r.excess)
        n_div = sum(r.divergent for r in rows)
        mark = "[red]✗ first[/]" if first and any((r.step, r.name) == (first.step, first.tap) for r in rows) else \
            (f"[red]✗ {n_div}[/]" if n_div else "[green]✓[/]")
        style = "red" if w.excess > 1 else ""
        t.add_row(key, escape(w.op), str(w.step), f"[{style}]{w.excess:.3g}[/]" if style else f"{w.excess:.3g}",
                  f"{w.rel_l2:.2g}", f"{w.ref_rel_l2:.2g}", f"{w.max_abs:.2g}", mark)
    return t


def render(result: DiffResult, console: Console) -> None:
    console.print(Group(summary(result), layer_table(result)))
