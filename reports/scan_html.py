"""The HTML view of a ScanResult / WeightsDiffResult: one self-contained page, the terminal's grouping of findings
first, then every tensor."""

from __future__ import annotations

from qwen3dbg.reports.html import esc, figure_png, page, pyplot
from qwen3dbg.reports.scan_groups import NORM_COLUMNS, by_tensor, counts_line, num, peaks_by_layer, read_line, what

from qwen3dbg.scan.findings import ScanResult, Verdict, WeightsDiffResult

CSS_CLASS = {"error": "bad", "warning": "warn", "info": "info"}


def _html_findings(result: Verdict) -> str:
    """The terminal's grouping: one row per finding, the tensor named on its group's first row."""
    rows = "".join(
        f"<tr><td>{esc(tensor or 'the checkpoint as a whole') if i == 0 else ''}</td>"
        f'<td class="{CSS_CLASS[f.severity]}">{esc(f.severity)}</td><td>{esc(f.check)}</td>'
        f"<td>{esc(what(f))}</td><td>{esc(f.why)}</td></tr>"
        for tensor, fs in by_tensor(result)
        for i, f in enumerate(fs)
    )
    if not rows:
        return '<p class="ok">No findings.</p>'
    return (
        '<table class="text"><tr><th>tensor</th><th>severity</th><th>check</th><th>finding</th>'
        f"<th>why it matters</th></tr>{rows}</table>"
    )


def _html_verdict(result: Verdict) -> str:
    cls = "bad" if result.counts()["error"] else "ok"
    return f'<p class="verdict {cls}">{esc(counts_line(result))}</p>'


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
    peaks = peaks_by_layer(result)
    th = result.thresholds["norm"]
    peak_rows = "".join(
        f"<tr><td>{esc(layer)}</td>"
        + "".join(f'<td class="{"warn" if row.get(c, 0) > th else ""}">{num(row.get(c))}</td>' for c in NORM_COLUMNS)
        + "</tr>"
        for layer, row in peaks
    )
    tensor_rows = "".join(
        f"<tr><td>{esc(t.name)}</td><td>{esc(t.dtype)}</td><td>{esc(list(t.shape))}</td><td>{esc(t.file)}</td>"
        + (
            "".join(
                f"<td>{num(v)}</td>"
                for v in (
                    t.stats.min,
                    t.stats.max,
                    t.stats.mean,
                    t.stats.std,
                    t.stats.absmax,
                    t.stats.nonfinite,
                    t.stats.n_zero,
                )
            )
            if t.stats
            else '<td colspan="7">not read</td>'
        )
        + "</tr>"
        for t in result.tensors
    )
    body = (
        f"<h1>scan-checkpoint</h1><p><code>{esc(result.path)}</code> ({esc(read_line(result))})</p>"
        f"{_html_verdict(result)}<h2>Findings</h2>{_html_findings(result)}"
        f"<h2>Largest |norm weight| per layer (flagged above {th:g})</h2>"
        + (_peaks_plot(result) if any(p.layer is not None for p in result.norm_peaks) else "")
        + "<table><tr><th>layer</th>"
        + "".join(f"<th>{c}</th>" for c in NORM_COLUMNS)
        + f"</tr>{peak_rows}</table>"
        "<h2>Tensors</h2><table><tr><th>tensor</th><th>dtype</th><th>shape</th><th>file</th><th>min</th><th>max</th>"
        f"<th>mean</th><th>std</th><th>absmax</th><th>non-finite</th><th>zeros</th></tr>{tensor_rows}</table>"
    )
    return page(f"scan-checkpoint {result.path}", body)


def weights_diff_html(result: WeightsDiffResult) -> str:
    rows = "".join(
        f'<tr><td>{esc(d.name)}</td><td class="{"" if d.relation in ("equal", "rounding") else "bad"}">'
        f"{esc(d.relation)}</td><td>{esc(d.dtype_a)}</td><td>{esc(d.dtype_b)}</td><td>{esc(list(d.shape_a))}</td>"
        f"<td>{esc(list(d.shape_b))}</td><td>{num(d.max_abs_diff)}</td><td>{num(d.rel_to_absmax)}</td>"
        f"<td>{num(d.tolerance)}</td></tr>"
        for d in result.tensors
    )
    body = (
        f"<h1>diff-weights</h1><p>A <code>{esc(result.a)}</code><br>B <code>{esc(result.b)}</code></p>"
        f"{_html_verdict(result)}<h2>Findings</h2>{_html_findings(result)}<h2>Tensors in both</h2>"
        "<table><tr><th>tensor</th><th>relation</th><th>dtype A</th><th>dtype B</th><th>shape A</th><th>shape B</th>"
        f"<th>max |a-b|</th><th>/ absmax</th><th>allowed</th></tr>{rows}</table>"
    )
    return page(f"diff-weights {result.a} {result.b}", body)
