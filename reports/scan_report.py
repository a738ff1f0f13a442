"""Views of a ScanResult / WeightsDiffResult: terminal (rich) and self-contained HTML, which group findings
alike (JSON: reports/scan_json.py). Nothing is recomputed."""

from __future__ import annotations

from collections import defaultdict

from qwen3dbg.reports.html import esc, figure_png, page, pyplot
from qwen3dbg.scan.findings import WeightsDiffResult, CheckpointFinding, ScanResult, Verdict, rank
from qwen3dbg.text import escape
from qwen3dbg.wording import plural

STYLE = {"error": "bold red", "warning": "yellow", "info": "blue"}
CSS_CLASS = {"error": "bad", "warning": "warn", "info": "info"}
PER_CHECK = 6  # findings of one check the terminal shows (JSON and HTML list all)
NORM_COLUMNS = ("q_norm", "k_norm", "input_layernorm", "post_attention_layernorm", "norm")  # norm: the final one


def _verdict_line(result: Verdict) -> str:
    worst = result.worst()
    style = STYLE.get(worst, "bold green")
    return f"[{style}]{_counts(result)}[/{style}]"


def _counts(result: Verdict) -> str:
    c = result.counts()
    return f"{plural(c['error'], 'error')}, {plural(c['warning'], 'warning')}, {plural(c['info'], 'note')}"


#: checks shown first within a severity: a non-finite weight turns every activation it touches into NaN
FIRST_CHECKS = ("nonfinite",)
SHOWN_TENSORS = 12  # tensors with findings the terminal lists (JSON and HTML list all)
RATE_MIN_BYTES = 100e6  # below this a read takes milliseconds and its GB/s says nothing


def _severity_key(findings: list[CheckpointFinding]) -> tuple:
    return min((-rank(f.severity), f.check not in FIRST_CHECKS) for f in findings)


def by_tensor(result: Verdict) -> list[tuple[str | None, list[CheckpointFinding]]]:
    """Findings grouped by tensor (None: the checkpoint as a whole), worst group first, non-finite first
    among equals; within a group, worst finding first. Ties keep the scan's order."""
    groups: dict[str | None, list[CheckpointFinding]] = defaultdict(list)
    for f in result.findings:
        groups[f.tensor].append(f)
    ordered = sorted(groups.items(), key=lambda kv: _severity_key(kv[1]))
    return [(tensor, sorted(fs, key=lambda f: _severity_key([f]))) for tensor, fs in ordered]


def _what(f: CheckpointFinding) -> str:
    """The message without the tensor name its group heading already shows."""
    return f.message.removeprefix(f"{f.tensor} ") if f.tensor else f.message


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
            grid.add_row("", f"[{STYLE[f.severity]}]{f.check}[/]", escape(_what(f)))
        console.print(grid)
    if len(groups) > SHOWN_TENSORS:
        console.print(f"... and {plural(len(groups) - SHOWN_TENSORS, 'more tensor')} with findings "
                      "(all in --json / --html)")
    why = {f.check: f.why for _, fs in groups for f in fs}
    if why:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column()
        for check, text in why.items():
            grid.add_row(check, escape(text))
        console.print("[dim]what the checks mean[/dim]")
        console.print(grid)


def _read_line(result: ScanResult) -> str:
    """What was read and how fast: a rate only where the read is long enough to measure one."""
    gb = result.bytes_read / 1e9
    size = f"{gb:.3g} GB" if gb >= 1 else f"{result.bytes_read / 1e6:.3g} MB"
    rate = f", {gb / result.seconds:.2f} GB/s" if result.bytes_read >= RATE_MIN_BYTES and result.seconds > 0 else ""
    return (f"{result.format}, {plural(len(result.files), 'file')}, {plural(len(result.tensors), 'tensor')}, "
            f"{size} read in {result.seconds:.2f} s{rate}")


def _peaks_by_layer(result: ScanResult) -> list[tuple[str, dict[str, float]]]:
    rows: dict = defaultdict(dict)
    for p in result.norm_peaks:
        rows[p.layer][p.kind] = p.absmax
    layers = sorted(k for k in rows if k is not None)
    return [(str(k), rows[k]) for k in layers] + ([("final", rows[None])] if None in rows else [])


def print_scan(result: ScanResult, console) -> None:
    from rich.table import Table

    console.print(f"[bold]scan-checkpoint[/bold] {escape(str(result.path))} ({_read_line(result)})", soft_wrap=True)
    peaks = _peaks_by_layer(result)
    if peaks:
        th = result.thresholds["norm"]
        table = Table(title=f"largest |norm weight| per layer (flagged above {th:g})", header_style="bold")
        table.add_column("layer")
        for col in NORM_COLUMNS:
            table.add_column(col, justify="right")
        for layer, row in peaks:
            table.add_row(layer, *[f"[yellow]{row[c]:.4g}[/]" if row.get(c, 0) > th else _num(row.get(c))
                                   for c in NORM_COLUMNS])
        console.print(table)
    _terminal_findings(console, result)
    console.print(_verdict_line(result))


def print_weights_diff(result: WeightsDiffResult, console) -> None:
    rel = defaultdict(int)
    for d in result.tensors:
        rel[d.relation] += 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(rel.items(), key=lambda x: -x[1]))
    console.print(f"[bold]diff-weights[/bold] A={escape(str(result.a))} B={escape(str(result.b))}: "
                  f"{len(result.tensors)} tensors in both "
                  f"({summary or 'none'}), {len(result.only_a)} only in A, {len(result.only_b)} only in B "
                  f"({result.seconds:.2f} s)")
    _terminal_findings(console, result)
    console.print(_verdict_line(result))


def _html_findings(result: Verdict) -> str:
    """The terminal's grouping: one row per finding, the tensor named on its group's first row."""
    rows = "".join(f'<tr><td>{esc(tensor or "the checkpoint as a whole") if i == 0 else ""}</td>'
                   f'<td class="{CSS_CLASS[f.severity]}">{esc(f.severity)}</td><td>{esc(f.check)}</td>'
                   f'<td>{esc(_what(f))}</td><td>{esc(f.why)}</td></tr>'
                   for tensor, fs in by_tensor(result) for i, f in enumerate(fs))
    if not rows:
        return '<p class="ok">No findings.</p>'
    return ('<table class="text"><tr><th>tensor</th><th>severity</th><th>check</th><th>finding</th>'
            f"<th>why it matters</th></tr>{rows}</table>")


def _html_verdict(result: Verdict) -> str:
    cls = "bad" if result.counts()["error"] else "ok"
    return f'<p class="verdict {cls}">{esc(_counts(result))}</p>'


def _num(x) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _peaks_plot(result: ScanResult) -> str:
    """Largest |weight| of each per-layer norm against the layer, log scale, with the threshold."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for kind in NORM_COLUMNS[:4]:
        pts = sorted((p.layer, p.absmax) for p in result.norm_peaks if p.kind == kind)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=kind)
    ax.axhline(result.thresholds["norm"], color="#b42318", ls="--", lw=1, label="threshold")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |weight|")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return figure_png(fig)


def scan_html(result: ScanResult) -> str:
    peaks = _peaks_by_layer(result)
    th = result.thresholds["norm"]
    peak_rows = "".join(
        f"<tr><td>{esc(layer)}</td>" + "".join(f'<td class="{"warn" if row.get(c, 0) > th else ""}">{_num(row.get(c))}</td>'
                                               for c in NORM_COLUMNS) + "</tr>"
        for layer, row in peaks)
    tensor_rows = "".join(
        f"<tr><td>{esc(t.name)}</td><td>{esc(t.dtype)}</td><td>{esc(list(t.shape))}</td><td>{esc(t.file)}</td>"
        + ("".join(f"<td>{_num(v)}</td>" for v in (t.stats.min, t.stats.max, t.stats.mean, t.stats.std,
                                                   t.stats.absmax, t.stats.nonfinite, t.stats.n_zero))
           if t.stats else '<td colspan="7">not read</td>') + "</tr>"
        for t in result.tensors)
    body = (f"<h1>scan-checkpoint</h1><p><code>{esc(result.path)}</code> ({esc(_read_line(result))})</p>"
            f"{_html_verdict(result)}<h2>Findings</h2>{_html_findings(result)}"
            f"<h2>Largest |norm weight| per layer (flagged above {th:g})</h2>"
            + (_peaks_plot(result) if any(p.layer is not None for p in result.norm_peaks) else "")
            + "<table><tr><th>layer</th>" + "".join(f"<th>{c}</th>" for c in NORM_COLUMNS) + f"</tr>{peak_rows}</table>"
            "<h2>Tensors</h2><table><tr><th>tensor</th><th>dtype</th><th>shape</th><th>file</th><th>min</th><th>max</th>"
            f"<th>mean</th><th>std</th><th>absmax</th><th>non-finite</th><th>zeros</th></tr>{tensor_rows}</table>")
    return page(f"scan-checkpoint {result.path}", body)


def weights_diff_html(result: WeightsDiffResult) -> str:
    rows = "".join(
        f'<tr><td>{esc(d.name)}</td><td class="{"" if d.relation in ("equal", "rounding") else "bad"}">'
        f"{esc(d.relation)}</td><td>{esc(d.dtype_a)}</td><td>{esc(d.dtype_b)}</td><td>{esc(list(d.shape_a))}</td>"
        f"<td>{esc(list(d.shape_b))}</td><td>{_num(d.max_abs_diff)}</td><td>{_num(d.rel_to_absmax)}</td>"
        f"<td>{_num(d.tolerance)}</td></tr>" for d in result.tensors)
    body = (f"<h1>diff-weights</h1><p>A <code>{esc(result.a)}</code><br>B <code>{esc(result.b)}</code></p>"
            f"{_html_verdict(result)}<h2>Findings</h2>{_html_findings(result)}<h2>Tensors in both</h2>"
            "<table><tr><th>tensor</th><th>relation</th><th>dtype A</th><th>dtype B</th><th>shape A</th><th>shape B</th>"
            f"<th>max |a-b|</th><th>/ absmax</th><th>allowed</th></tr>{rows}</table>")
    return page(f"diff-weights {result.a} {result.b}", body)
