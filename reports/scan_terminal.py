"""The terminal view (rich) of a ScanResult / WeightsDiffResult: findings per tensor, worst first, then the verdict."""

from __future__ import annotations

from collections import defaultdict

from qwen3dbg.reports.scan_groups import NORM_COLUMNS, by_tensor, counts_line, num, peaks_by_layer, read_line, what

from qwen3dbg.scan.findings import ScanResult, Verdict, WeightsDiffResult
from qwen3dbg.util.text import escape, plural

STYLE = {"error": "bold red", "warning": "yellow", "info": "blue"}
SHOWN_TENSORS = 12  # tensors with findings the terminal lists (JSON and HTML list all)


def _verdict_line(result: Verdict) -> str:
    worst = result.worst()
    style = STYLE.get(worst, "bold green")
    return f"[{style}]{counts_line(result)}[/{style}]"


def _terminal_findings(console, result: Verdict) -> None:
    """One block per tensor, worst first: its name, then each finding's check and message; then what each
    check that fired means, once."""
    from rich.table import Table

    groups = by_tensor(result)
    if not groups:
        console.print("[bold green]no findings[/bold green]")
    check_width = max((len(f.check) for f in result.findings), default=0)
    for tensor, fs in groups[:SHOWN_TENSORS]:
        worst = fs[0].severity
        console.print(f"[{STYLE[worst]}]{worst:<8}[/]{escape(tensor or 'the checkpoint as a whole')}", soft_wrap=True)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(min_width=6)
        grid.add_column(no_wrap=True, min_width=check_width)
        grid.add_column()
        for f in fs:
            grid.add_row("", f"[{STYLE[f.severity]}]{f.check}[/]", escape(what(f)))
        console.print(grid)
    if len(groups) > SHOWN_TENSORS:
        console.print(
            f"... and {plural(len(groups) - SHOWN_TENSORS, 'more tensor')} with findings (all in --json / --html)"
        )
    why = {f.check: f.why for _, fs in groups for f in fs}
    if why:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column()
        for check, text in why.items():
            grid.add_row(check, escape(text))
        console.print("[dim]what the checks mean[/dim]")
        console.print(grid)


def print_scan(result: ScanResult, console) -> None:
    from rich.table import Table

    console.print(f"[bold]scan-checkpoint[/bold] {escape(str(result.path))} ({read_line(result)})", soft_wrap=True)
    peaks = peaks_by_layer(result)
    if peaks:
        th = result.thresholds["norm"]
        table = Table(title=f"largest |norm weight| per layer (flagged above {th:g})", header_style="bold")
        table.add_column("layer")
        for col in NORM_COLUMNS:
            table.add_column(col, justify="right")
        for layer, row in peaks:
            table.add_row(
                layer, *[f"[yellow]{row[c]:.4g}[/]" if row.get(c, 0) > th else num(row.get(c)) for c in NORM_COLUMNS]
            )
        console.print(table)
    _terminal_findings(console, result)
    console.print(_verdict_line(result))


def print_weights_diff(result: WeightsDiffResult, console) -> None:
    rel = defaultdict(int)
    for d in result.tensors:
        rel[d.relation] += 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(rel.items(), key=lambda x: -x[1]))
    console.print(
        f"[bold]diff-weights[/bold] A={escape(str(result.a))} B={escape(str(result.b))}: "
        f"{len(result.tensors)} tensors in both "
        f"({summary or 'none'}), {len(result.only_a)} only in A, {len(result.only_b)} only in B "
        f"({result.seconds:.2f} s)"
    )
    _terminal_findings(console, result)
    console.print(_verdict_line(result))
