"""The HTML view of a DiffResult: one self-contained file, verdict and diagnosis first, then the plots, the
logits and the tap table."""

from __future__ import annotations

import json
from dataclasses import dataclass

from qwen3dbg.reports.html import esc, figure_png, page, pyplot

from qwen3dbg.diff.result import DiffResult, TapResult
from qwen3dbg.diff.summary import TONE, summary
from qwen3dbg.tapstore.schema import LAYER_OPS

#: op families, one panel each in the error-vs-layer plot
FAMILIES = {
    "attention inputs": ("attn_norm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_rope", "k_rope"),
    "attention": ("k_cache", "v_cache", "attn_scores", "attn_probs", "attn_out", "o_proj"),
    "feed-forward": ("mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "moe.router_logits", "moe.topk_weights", "mlp.out"),
    "residual stream": ("resid_mid", "resid_out"),
}
_FLOOR = 1e-12  # where an error is exactly zero, a log axis still needs a value


# The plots: error against layer per op family, a layer x op heatmap, a per-step view for decode; the tap table
# shows what is interesting first, folded and sortable. Every string from a store, a checkpoint or the user goes
# through `esc`; plots carry schema names only.
def _worst(result: DiffResult) -> dict[tuple[int, str], TapResult]:
    """(layer, op) -> the tap with the largest excess over all steps."""
    out: dict[tuple[int, str], TapResult] = {}
    for t in result.taps:
        if t.layer is None or t.status == "not_compared":
            continue
        key = (t.layer, t.op)
        if key not in out or t.excess > out[key].excess:
            out[key] = t
    return out


def error_plot(result: DiffResult) -> str:
    """Rel. L2 error to fp64 against layer, one panel per op family: candidate solid, reference dashed."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    worst = _worst(result)
    layers = sorted({k[0] for k in worst})
    d = result.first_divergence
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True)
    for ax, (family, ops) in zip(axes.flat, FAMILIES.items()):
        drawn = False
        for i, op in enumerate(ops):
            pts = [(layer, worst[(layer, op)]) for layer in layers if (layer, op) in worst]
            if not pts:
                continue
            drawn = True
            color = plt.cm.tab10(i % 10)
            xs = [p[0] for p in pts]
            ax.plot(xs, [max(p[1].rel_l2, _FLOOR) for p in pts], "-o", ms=3, color=color, label=op)
            ax.plot(xs, [max(p[1].ref_rel_l2, _FLOOR) for p in pts], "--", lw=0.8, color=color, alpha=0.7)
            if d is not None and d.op == op and (d.layer, op) in worst:  # on its own line: the worst step's value
                ax.plot([d.layer], [max(worst[(d.layer, op)].rel_l2, _FLOOR)], "*", ms=16, color="red", zorder=5)
        if d is not None and d.layer is not None:
            ax.axvline(d.layer, color="red", lw=1, alpha=0.6)
        ax.set_title(family, fontsize=10)
        if not drawn:  # a store of selected taps may hold none of this family
            ax.text(0.5, 0.5, "no taps of this family compared", transform=ax.transAxes, ha="center", fontsize=8)
            continue
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # off the data
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("rel. L2 error to fp64")
    fig.suptitle(
        "candidate (solid) and reference (dashed) error against layer, each op at its worst step; "
        "red star: the first divergent op, on its own line",
        fontsize=10,
    )
    fig.tight_layout()
    return figure_png(fig)


def heatmap(result: DiffResult) -> str:
    """Layer x op grid of the excess (error / tolerance, worst over steps), log colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = pyplot()
    worst = _worst(result)
    layers = sorted({k[0] for k in worst})
    ops = [o.op for o in LAYER_OPS if any((layer, o.op) in worst for layer in layers)]
    if not ops:  # a store of selected taps (capture --taps) may hold no layer tap at all
        return "<p>No tap inside the layers was compared.</p>"
    grid = np.full((len(layers), len(ops)), np.nan)
    for (layer, op), t in worst.items():
        grid[layers.index(layer), ops.index(op)] = min(max(t.excess, 1e-3), 1e6)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * len(ops), 14), min(1.5 + 0.3 * len(layers), 12)))
    im = ax.imshow(
        grid,
        aspect="auto",
        cmap="RdYlGn_r",
        norm=LogNorm(vmin=1e-2, vmax=max(1e2, np.nanmax(grid))),
        interpolation="nearest",
    )
    ax.set_xticks(range(len(ops)), ops, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=8)
    ax.set_ylabel("layer")
    d = result.first_divergence
    if d is not None and d.layer is not None and d.op in ops:
        ax.add_patch(
            plt.Rectangle((ops.index(d.op) - 0.5, layers.index(d.layer) - 0.5), 1, 1, fill=False, ec="blue", lw=2.5)
        )
    fig.colorbar(im, ax=ax, label="excess (> 1 divergent)")
    ax.set_title("error / tolerance per layer and op (worst over steps); blue box: first divergence", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def step_plot(result: DiffResult) -> str:
    """Decode: the worst excess of each layer at each step, step x layer, log colour scale; one column per
    step, so 256 steps stay one picture."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    n_layers = result.config["num_hidden_layers"]
    grid = np.full((n_layers, len(result.steps)), 1e-3)
    for t in result.taps:
        if t.layer is not None and t.status != "not_compared":
            grid[t.layer, t.step] = max(grid[t.layer, t.step], min(t.excess, 1e6))
    fig, ax = plt.subplots(figsize=(10, min(1.5 + 0.3 * n_layers, 8)))
    im = ax.imshow(
        grid,
        aspect="auto",
        cmap="RdYlGn_r",
        norm=LogNorm(vmin=1e-2, vmax=max(1e2, grid.max())),
        interpolation="nearest",
        origin="lower",
    )
    ax.set_xlabel("step (0: prefill)")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label="worst excess in the layer (> 1 divergent)")
    ax.set_title("per step: worst error / tolerance in each layer (red: divergent)", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def _summary(result: DiffResult) -> str:
    bad = result.exit_code != 0
    parts = []
    for label, text in summary(result):
        if label == "verdict":
            parts.append(f'<div class="verdict {"bad" if bad else "ok"}">{esc(text)}</div>')
        else:
            parts.append(f'<p class="{TONE.get(label, "")}"><b>{esc(label)}:</b> {esc(text)}</p>')
    rule = ", ".join(f"{esc(k)} {esc(v)}" for k, v in result.rule.items())
    parts.append(f"<p style='font-size:.85em;color:#666'>Rule (docs/differ.md): {rule}; model {esc(result.model)}.</p>")
    return "".join(parts)


#: clean taps shown one by one beside the divergent ones: those nearest to their limit
NEAREST = 10


@dataclass
class Row:
    """One row of the tap table: a tap over all steps, or the clean rest of a layer collapsed."""

    kind: str  # first | divergent | near | clean
    label: str
    worst: TapResult  # the worst step's result (of the collapsed rest: its worst tap)
    divergent_steps: list[int]
    steps: int
    collapsed: int = 0  # taps folded into a clean row


def tap_rows(result: DiffResult) -> list[Row]:
    """The table's rows, its size set by what is interesting, not by steps x taps: each divergent tap once
    (over all its steps, the first divergence first), then the NEAREST clean taps closest to their limit,
    then one row per layer for the clean rest."""
    by_name: dict[str, list[TapResult]] = {}
    for t in result.taps:
        if t.status != "not_compared":
            by_name.setdefault(t.name, []).append(t)
    n_steps, first = len(result.steps), result.first_divergence
    divergent, clean = [], []
    for name, ts in by_name.items():
        worst = max(ts, key=lambda t: t.excess)
        bad = [t.step for t in ts if t.divergent]
        if bad:
            kind = "first" if first is not None and first.tap == name else "divergent"
            divergent.append(Row(kind, name, worst, bad, n_steps))
        else:
            clean.append(Row("clean", name, worst, [], n_steps))
    divergent.sort(key=lambda r: r.kind != "first")
    near = sorted(clean, key=lambda r: -r.worst.excess)[:NEAREST]
    for r in near:
        r.kind = "near"
    rest: dict[int | None, list[Row]] = {}
    for r in clean:
        if r.kind == "clean":
            rest.setdefault(r.worst.layer, []).append(r)
    folded = [
        Row(
            "clean",
            f"layer {layer}" if layer is not None else "outside the layers",
            max((r.worst for r in rows), key=lambda t: t.excess),
            [],
            n_steps,
            collapsed=len(rows),
        )
        for layer, rows in rest.items()
    ]
    return divergent + near + folded


def _ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)


_KIND = {
    "first": "✗ first divergence",
    "divergent": "✗ divergent",
    "near": "! nearest to limit",
    "clean": "✓ within noise",
}
_COLUMNS = (
    "status",
    "tap",
    "divergent steps",
    "worst step",
    "excess",
    "rel. L2",
    "ref rel. L2",
    "max |err|",
    "ref max |err|",
    "ulps vs ref",
    "worst at",
    "note",
)


def _num_cell(x: float) -> str:
    return f'<td data-v="{json.dumps(x)}">{x:.3g}</td>'


def _row_html(r: Row) -> str:
    t = r.worst
    steps = (
        f"{_ranges(r.divergent_steps)} ({len(r.divergent_steps)} of {r.steps})"
        if r.divergent_steps
        else f"none of {r.steps}"
    )
    label = r.label if not r.collapsed else f"{r.label}: {r.collapsed} more taps (worst {t.name})"
    worst_at = ", ".join(f"{k} {v}" for k, v in (t.worst or {}).items() if k not in ("step", "batch"))
    cls = r.kind + (" divergent" if r.kind == "first" else "")
    return (
        f'<tr class="{cls}"><td>{esc(_KIND[r.kind])}</td><td>{esc(label)}</td>'
        f'<td data-v="{len(r.divergent_steps)}">{esc(steps)}</td><td data-v="{t.step}">{t.step}</td>'
        + _num_cell(t.excess)
        + "".join(_num_cell(x) for x in (t.rel_l2, t.ref_rel_l2, t.max_abs, t.ref_max_abs, t.diff_ulps))
        + f"<td>{esc(worst_at)}</td><td>{esc(t.reason)}</td></tr>"
    )


def table(result: DiffResult) -> str:
    """The tap table with its filter box; SCRIPT sorts by a header click and filters."""
    rows = tap_rows(result)
    head = "".join(f'<th scope="col" data-col="{esc(c)}">{esc(c)}</th>' for c in _COLUMNS)
    n = sum(r.kind in ("first", "divergent") for r in rows)
    return (
        '<p class="hint">Divergent taps first (each once, over all its steps), then the clean taps nearest to '
        f"their limit, then the clean rest folded per layer: {len(rows)} rows for {len(result.taps)} taps "
        f"of {len(result.steps)} steps; --json holds the details. Click a header to sort.</p>"
        '<p><input id="tap-filter" type="search" placeholder="filter by tap, e.g. layers.3. or k_rope"> '
        f'<label><input id="tap-divergent" type="checkbox"> divergent only ({n})</label></p>'
        f'<div class="wide"><table id="taps"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(map(_row_html, rows))}</tbody></table></div>"
    )


#: sorts the tap table by a clicked header (numbers by their data-v), filters by text and "divergent only";
#: it reads the table and embeds no data, so nothing from a store reaches the script context
SCRIPT = """
(function () {
  var table = document.getElementById("taps"), body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  function key(row, i) {
    var c = row.cells[i];
    return c.hasAttribute("data-v") ? parseFloat(c.getAttribute("data-v")) : c.textContent;
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows).map(function (r, n) { return [key(r, i), n, r]; });
      rows.sort(function (a, b) {
        var x = a[0], y = b[0];
        var c = (x !== x) - (y !== y) || (x < y ? -1 : x > y ? 1 : 0);  /* NaN last */
        return (asc ? c : -c) || a[1] - b[1];
      });
      rows.forEach(function (r) { body.appendChild(r[2]); });
    });
  });
  var text = document.getElementById("tap-filter"), only = document.getElementById("tap-divergent");
  function apply() {
    var q = text.value.toLowerCase();
    Array.prototype.forEach.call(body.rows, function (r) {
      r.hidden = r.cells[1].textContent.toLowerCase().indexOf(q) < 0 ||
                 (only.checked && !r.classList.contains("divergent"));
    });
  }
  text.addEventListener("input", apply);
  only.addEventListener("change", apply);
})();
"""


_METRIC = {"top1_agreement": "top-1 agreement", "top5_overlap": "top-5 overlap", "kl": "KL"}
_LOGITS_HELP = (
    "Each side's logits against the fp64 golden's, on the same tokens. <b>top-1 agreement</b>: the "
    "share of positions whose most likely next token is the golden's; <b>top-5 overlap</b>: the "
    "average share of the golden's five most likely tokens among the side's five; <b>KL</b>: "
    "KL(fp64 || side) in nats, averaged over positions. What a clean run of {dtype} looks like is the "
    "reference's column: it is that dtype's own rounding on these tokens. A candidate near it is as "
    "good as {dtype} gets; the divergence rule, not these numbers, gives the verdict."
)


def logits_section(result: DiffResult) -> str:
    """Logit agreement of the candidate beside the reference's (the clean-run baseline), the prefill and
    the decode steps summarised: the table stays two rows long at any step count."""
    logits = [t for t in result.taps if t.op == "logits" and "top1_agreement" in t.extra]
    if not logits:
        return ""
    keys = [k for k in logits[0].extra if k.startswith(("top", "kl"))]
    groups = [("prefill", logits[:1])] + (
        [(f"decode steps 1-{len(result.steps) - 1} (mean)", logits[1:])] if len(logits) > 1 else []
    )

    def mean(ts, key, side):
        vals = [(t.extra if side == "cand" else t.extra.get("reference", {})).get(key) for t in ts]
        vals = [v for v in vals if isinstance(v, float)]
        return f"{sum(vals) / len(vals):.3g}" if vals else "-"

    head = "".join(f"<th>{esc(_METRIC.get(k, k))}: candidate</th><th>reference</th>" for k in keys)
    body = "".join(
        f"<tr><td>{esc(label)}</td>"
        + "".join(f"<td>{mean(ts, k, 'cand')}</td><td>{mean(ts, k, 'ref')}</td>" for k in keys)
        + "</tr>"
        for label, ts in groups
    )
    return (
        f"<h2>Logits</h2><p>{_LOGITS_HELP.format(dtype=esc(result.dtype))}</p>"
        f"<table><tr><th>steps</th>{head}</tr>{body}</table>"
    )


def render_html(result: DiffResult) -> str:
    body = [
        f"<h1>qwen3dbg diff: {esc(result.side('cand').spec)} vs {esc(result.side('ref').spec)}</h1>",
        _summary(result),
        "<h2>Error against layer</h2>",
        error_plot(result),
        "<h2>Layer x op</h2>",
        heatmap(result),
    ]
    if len(result.steps) > 1:
        body += ["<h2>Per step</h2>", step_plot(result)]
    body += [logits_section(result), "<h2>Taps</h2>", table(result)]
    return page(f"qwen3dbg diff {result.side('cand').spec}", "".join(body), script=SCRIPT)
