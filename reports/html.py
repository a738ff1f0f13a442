"""Building blocks of the self-contained HTML reports: one page, inline CSS, plots as inline PNGs."""

from __future__ import annotations

import base64
import html
import io

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}table.text td,table.text th{text-align:left}
.ok{color:#17803d}.bad{color:#b42318;font-weight:600}.warn{color:#b54708}.info{color:#175cd3}
.verdict{font-size:1.2em;padding:.8em 1em;border-radius:6px;background:#f6f6f6;border-left:6px solid #999}
.verdict.ok{border-color:#17803d}.verdict.bad{border-color:#b42318}
img{max-width:100%;height:auto}code{background:#f4f4f4;padding:0 .2em}
#taps th{cursor:pointer;position:sticky;top:0}#taps th[aria-sort=ascending]::after{content:" \\25B2"}
#taps th[aria-sort=descending]::after{content:" \\25BC"}
#taps td{white-space:nowrap}#taps td:nth-child(2),#taps th:nth-child(2){text-align:left}
#taps td:nth-last-child(-n+2),#taps th:nth-last-child(-n+2){white-space:normal;text-align:left;min-width:9em}
.wide{overflow-x:auto}
tr.first td{background:#fbd5d2;font-weight:600}tr.divergent td{background:#fdecea}tr.near td{background:#fff4dc}
tr.clean td{color:#555}.hint{font-size:.9em;color:#555}
"""


# No network and no scripts from elsewhere: a report is one file that opens anywhere; a report may carry a small
# inline script of ours that reads its own tables. Every string that comes from a store, a checkpoint or a user
# goes through `esc`.
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pyplot():
    """matplotlib's pyplot on the Agg backend: reports are drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> str:
    """A matplotlib figure as an inline <img>; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def page(title: str, body: str, script: str = "") -> str:
    """One self-contained page; `script` is inline code of ours (never data), run after the body."""
    assert "</script" not in script.lower() and "<!--" not in script, "would end or confuse the script element"
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}{tail}</body></html>"
    )
