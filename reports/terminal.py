"""The terminal view of a DiffResult (rich): a one-screen summary first, then a compact per-layer table."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from qwen3dbg.diff.result import DiffResult, TapResult
from qwen3dbg.diff.summary import TONE, evidence, summary
from qwen3dbg.tapstore.schema import HEAD_OPS
from qwen3dbg.util.text import escape, short

#: how the terminal shows each tone of a summary label (qwen3dbg.diff.summary.TONE); plain labels are bold
HEAD_OP_NAMES = frozenset(o.op for o in HEAD_OPS)
_STYLE = {"bad": "bold red", "warn": "bold yellow", "info": "bold blue", "hint": "bold cyan", "quiet": "dim"}


def summary_panel(result: DiffResult) -> Panel:
    """Verdict, sides, first divergence with its origin, diagnosis, in-noise finding."""
    bad = result.exit_code != 0
    lines = []
    for label, text in summary(result):
        if label == "verdict":
            lines.append(f"[bold {'red' if bad else 'green'}]{escape(text)}[/]")
        elif label == "sides":
            lines.append(f"[dim]{escape(text)}[/]")
        else:
            lines.append(f"[{_STYLE.get(TONE.get(label), 'bold')}]{label}[/] {escape(text)}")
    return Panel("\n".join(lines), title="qwen3dbg diff", border_style="red" if bad else "green", expand=False)


def _row_of(r: TapResult) -> tuple[int, str]:
    """The table row of a tap, with its place in the model's order: embed, the layers, then the head."""
    if r.layer is not None:
        return r.layer, str(r.layer)
    return (-1, "embed") if r.op in HEAD_OP_NAMES else (1 << 30, "head")


def layer_table(result: DiffResult) -> Table:
    """One row per layer (plus the ops outside the layers): its worst tap over all steps, with the statistic
    that makes it so. Fits 80 columns: no borders, names never cut."""
    t = Table(
        title="Worst tap of each layer (head: final_norm, logits). Excess = error / tolerance, "
        "over 1 is divergent; evidence: the candidate's error vs the reference's",
        title_justify="left",
        box=None,
        header_style="bold",
        pad_edge=False,
    )
    for col, just in (
        ("layer", "left"),
        ("worst op", "left"),
        ("step", "right"),
        ("excess", "right"),
        ("evidence", "left"),
        ("divergent", "right"),
    ):
        t.add_column(col, justify=just, no_wrap=True)
    groups: dict[tuple[int, str], list[TapResult]] = {}
    for r in result.taps:
        groups.setdefault(_row_of(r), []).append(r)
    first = result.first_divergence
    for (_, key), rows in sorted(groups.items()):
        rows = [r for r in rows if r.status != "not_compared"]
        if not rows:
            continue
        w = max(rows, key=lambda r: r.excess)
        n_div = sum(r.divergent for r in rows)
        f = next((r for r in rows if first is not None and (r.step, r.name) == (first.step, first.tap)), None)
        # the first divergence gets its own row when it is not the layer's worst: the mark sits on its op
        for r in [f] if f is w else [f, w] if f is not None else [w]:
            if r is f and f is not w:
                mark = "[red]✗ first[/]"
            else:
                mark = f"[red]{n_div} ✗{' first' if r is f else ''}[/]" if n_div else "[green]0 ✓[/]"
            excess = f"[red]{short(r.excess, 3)}[/]" if r.excess > 1 else short(r.excess, 3)
            t.add_row(key, escape(r.op), str(r.step), excess, escape(evidence(r)), mark)
    return t


def render(result: DiffResult, console: Console) -> None:
    console.print(Group(summary_panel(result), layer_table(result)))
