"""The HTML view of a DiffResult: one self-contained file, verdict and diagnosis first, then the plots
(error against layer per op family, layer x op heatmap, per-step view for decode) and the full table.
Every string from a store, a checkpoint or the user goes through `esc`; plots carry schema names only."""

from __future__ import annotations


from qwen3dbg.diff.result import DiffResult, TapResult
from qwen3dbg.reports.html import esc, figure_png, page, pyplot
from qwen3dbg.taps import LAYER_OPS

#: op families, one panel each in the error-vs-layer plot
FAMILIES = {
    "attention inputs": ("attn_norm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_rope", "k_rope"),
    "attention": ("k_cache", "v_cache", "attn_scores", "attn_probs", "attn_out", "o_proj"),
    "feed-forward": ("mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "moe.router_logits", "moe.topk_weights", "mlp.out"),
    "residual stream": ("resid_mid", "resid_out"),
}
_FLOOR = 1e-12  # where an error is exactly zero, a log axis still needs a value


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
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    for ax, (family, ops) in zip(axes.flat, FAMILIES.items()):
        for i, op in enumerate(ops):
            pts = [(layer, worst[(layer, op)]) for layer in layers if (layer, op) in worst]
            if not pts:
                continue
            color = plt.cm.tab10(i % 10)
            xs = [p[0] for p in pts]
            ax.plot(xs, [max(p[1].rel_l2, _FLOOR) for p in pts], "-o", ms=3, color=color, label=op)
            ax.plot(xs, [max(p[1].ref_rel_l2, _FLOOR) for p in pts], "--", lw=0.8, color=color, alpha=0.7)
            if d is not None and d.op == op and d.layer is not None:
                ax.plot([d.layer], [max(d.rel_l2, _FLOOR)], "*", ms=16, color="red", zorder=5)
        if d is not None and d.layer is not None:
            ax.axvline(d.layer, color="red", lw=1, alpha=0.6)
        ax.set_yscale("log")
        ax.set_title(family, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("rel. L2 error to fp64")
    fig.suptitle("candidate (solid) and reference (dashed) error against layer; red star: first divergence", fontsize=10)
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
    grid = np.full((len(layers), len(ops)), np.nan)
    for (layer, op), t in worst.items():
        grid[layers.index(layer), ops.index(op)] = min(max(t.excess, 1e-3), 1e6)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * len(ops), 14), min(1.5 + 0.3 * len(layers), 12)))
    im = ax.imshow(grid, aspect="auto", cmap="RdYlGn_r", norm=LogNorm(vmin=1e-2, vmax=max(1e2, np.nanmax(grid))),
                   interpolation="nearest")
    ax.set_xticks(range(len(ops)), ops, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=8)
    ax.set_ylabel("layer")
    d = result.first_divergence
    if d is not None and d.layer is not None and d.op in ops:
        ax.add_patch(plt.Rectangle((ops.index(d.op) - 0.5, layers.index(d.layer) - 0.5), 1, 1, fill=False, ec="blue", lw=2.5))
    fig.colorbar(im, ax=ax, label="excess (> 1 divergent)")
    ax.set_title("error / tolerance per layer and op (worst over steps); blue box: first divergence", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def step_plot(result: DiffResult) -> str:
    """Decode: the worst excess of each layer at each step, one line per step."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    n_layers = result.config["num_hidden_layers"]
    for s in range(len(result.steps)):
        rows = [t for t in result.taps if t.step == s and t.layer is not None and t.status != "not_compared"]
        ys = [max([t.excess for t in rows if t.layer == layer] or [_FLOOR]) for layer in range(n_layers)]
        ax.plot(range(n_layers), [max(y, 1e-3) for y in ys], "-o", ms=3, label="prefill" if s == 0 else f"decode {s}")
    ax.axhline(1, color="red", lw=1, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("worst excess in the layer")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(True, alpha=0.3)
    ax.set_title("per step: worst error / tolerance in each layer (dotted: divergence threshold)", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


_CLASS = {"first NaN/inf": "bad", "golden NaN/inf": "bad", "reference": "warn",
          "within noise": "info", "routing ties": "warn", "note": "warn", "systematic": "warn"}


def _summary(result: DiffResult) -> str:
    bad = result.exit_code != 0
    parts = []
    for label, text in result.summary():
        if label == "verdict":
            parts.append(f'<div class="verdict {"bad" if bad else "ok"}">{esc(text)}</div>')
        else:
            parts.append(f'<p class="{_CLASS.get(label, "")}"><b>{esc(label)}:</b> {esc(text)}</p>')
    rule = ", ".join(f"{esc(k)} {esc(v)}" for k, v in result.rule.items())
    parts.append(f"<p style='font-size:.85em;color:#666'>Rule (docs/differ.md): {rule}; model {esc(result.model)}.</p>")
    return "".join(parts)


def table(result: DiffResult) -> str:
    import pandas as pd

    rows = [{"step": t.step, "tap": t.name, "status": t.status, "excess": t.excess, "rel. L2": t.rel_l2,
             "ref rel. L2": t.ref_rel_l2, "max |err|": t.max_abs, "ref max |err|": t.ref_max_abs, "cosine": t.cosine,
             "mismatch": t.mismatch, "ulps vs ref": t.diff_ulps,
             "NaN/inf (ref/cand)": f"{t.nonfinite.get('ref', 0)}/{t.nonfinite.get('cand', 0)}" if t.nonfinite else "",
             "worst at": ", ".join(f"{k} {v}" for k, v in (t.worst or {}).items() if k != "step"),
             "note": t.reason} for t in result.taps]
    return pd.DataFrame(rows).to_html(index=False, escape=True, float_format=lambda x: f"{x:.3g}", border=0)


def render_html(result: DiffResult) -> str:
    body = [f"<h1>qwen3dbg diff: {esc(result.side('cand').spec)} vs {esc(result.side('ref').spec)}</h1>",
            _summary(result), "<h2>Error against layer</h2>", error_plot(result),
            "<h2>Layer x op</h2>", heatmap(result)]
    if len(result.steps) > 1:
        body += ["<h2>Per step</h2>", step_plot(result)]
    logits = [t for t in result.taps if t.op == "logits" and "top1_agreement" in t.extra]
    if logits:
        body.append("<h2>Logits</h2><ul>" + "".join(
            f"<li>step {t.step}: " + ", ".join(f"{esc(k)} {v:.4g}" for k, v in t.extra.items() if isinstance(v, float))
            + "</li>" for t in logits) + "</ul>")
    body += ["<h2>All taps</h2>", table(result)]
    return page(f"qwen3dbg diff {result.side('cand').spec}", "".join(body))
