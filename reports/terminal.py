"""The terminal view of a DiffResult (rich): a one-screen summary first, then a compact per-layer table."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from qwen3dbg.diff.result import DiffResult, TapResult


def summary(result: DiffResult) -> Panel:
    """Verdict, sides, first divergence with its origin, diagnosis, in-noise finding."""
    bad = result.first_divergence is not None
    lines = [f"[bold {'red' if bad else 'green'}]{escape(result.verdict)}[/]"]
    ref, cand = result.side("ref"), result.side("cand")
    n_steps = len(result.steps)
    lines.append(f"[dim]ref[/] {escape(ref.spec)}  [dim]cand[/] {escape(cand.spec)}  [dim]judged against[/] scratch "
                 f"float64  [dim]dtype[/] {result.dtype}  [dim]steps[/] prefill {result.steps[0]['tokens']} tokens"
                 + (f" + {n_steps - 1} decode" if n_steps > 1 else ""))
    d = result.first_divergence
    if d is not None:
        lines.append("")
        lines.append(f"[bold]first divergence[/] step {d.step}, {escape(d.tap)}: rel. L2 {d.rel_l2:.3g}, "
                     f"max |err| {d.max_abs:.3g}, worst at {escape(_coord(d.worst))}")
        if d.origin:
            lines.append(f"[bold]origin[/] {escape(d.origin['message'])}")
        if result.first_nonfinite and result.first_nonfinite["tap"] != d.tap:
            nf = result.first_nonfinite
            lines.append(f"[bold]first NaN/inf[/] step {nf['step']}, {escape(nf['tap'])} ({nf['count']} values)")
        lines.append("")
        if result.diagnosis:
            for i, x in enumerate(result.diagnosis):
                lines.append(f"[bold]{'diagnosis' if i == 0 else 'or'}[/] [cyan]{escape(x.signature)}[/]: {escape(x.message)}")
        else:
            lines.append("[bold]diagnosis[/] no known bug signature fits the tensors")
    if result.in_noise is not None:
        f = result.in_noise
        lines.append(f"[bold blue]within noise[/] step {f.step}, {escape(f.tap)}: {escape(f.message)}")
    if result.routing_ties:
        lines.append(f"[yellow]routing ties[/] {len(result.routing_ties)} token(s) chose other experts within the "
                     "router noise; their later taps were left out")
    missing = sorted({t.op for t in result.not_compared})
    if missing:
        lines.append(f"[dim]not compared (a side lacks them): {escape(', '.join(missing))}[/]")
    return Panel("\n".join(lines), title="qwen3dbg diff", border_style="red" if bad else "green", expand=False)


def _coord(worst: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (worst or {}).items() if k != "step") or "-"


def layer_table(result: DiffResult) -> Table:
    """One row per layer (plus the ops outside layers): its worst tap over all steps."""
    t = Table(title="worst tap per layer (excess = error / tolerance; > 1 is divergent)", title_justify="left")
    for col, just in (("layer", "left"), ("worst tap", "left"), ("step", "right"), ("excess", "right"),
                      ("rel. L2", "right"), ("ref rel. L2", "right"), ("max |err|", "right"), ("", "left")):
        t.add_column(col, justify=just)
    groups: dict[str, list[TapResult]] = {}
    for r in result.taps:
        key = "outside" if r.layer is None else str(r.layer)
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
                  f"{w.rel_l2:.2e}", f"{w.ref_rel_l2:.2e}", f"{w.max_abs:.2e}", mark)
    return t


def render(result: DiffResult, console: Console) -> None:
    console.print(Group(summary(result), layer_table(result)))
