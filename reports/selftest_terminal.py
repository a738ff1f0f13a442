"""The terminal view of a SelftestResult (rich): the tap table against the CPU twin and HF eager, then speed."""

from __future__ import annotations

from qwen3dbg.candidates.mine.selftest import SelftestResult


def render(res: SelftestResult, console) -> None:
    from rich.table import Table

    t = Table(
        title=f"mine on {res.device} ({res.dtype}): every tap of a {res.check_tokens}-token prefill and "
        f"{res.check_decode} decode steps, twin column: largest distance in ulps (0 = bit-identical)"
    )
    t.add_column("tap")
    t.add_column("vs CPU twin", justify="right")
    t.add_column("HF eager: identical", justify="right")
    t.add_column("HF eager: max rel err", justify="right")
    for row in res.taps:
        t.add_row(
            row.tap,
            "-" if row.ulps_vs_twin is None else str(row.ulps_vs_twin),
            f"{100 * row.identical_vs_hf:.1f}%",
            f"{row.rel_err_vs_hf:.1e}",
        )
    console.print(t)
    for problem in res.problems:
        console.print(f"[red]FAIL[/red] {problem}")
    if not res.problems:
        twin = (
            "bit-identical to the CPU twin on every tap; " if any(r.ulps_vs_twin is not None for r in res.taps) else ""
        )
        console.print(
            f"[green]ok[/green] {twin}a capture to a tap store reads back bit for bit; capture off gives "
            "the same logits"
        )
    if not res.speed:
        console.print("no speed table: emulated kernels run on the CPU, and their time says nothing about a GPU")
        return
    s = Table(title=f"speed: prefill of {res.prompt_tokens} tokens, {res.decode_steps} decode steps (batch 1)")
    for col in ("implementation", "prefill tok/s", "decode tok/s", "decode ms/token"):
        s.add_column(col, justify="right" if col != "implementation" else "left")
    for row in res.speed:
        s.add_row(row.impl, f"{row.prefill_tok_s:,.0f}", f"{row.decode_tok_s:,.1f}", f"{1e3 / row.decode_tok_s:.3f}")
    limit = res.bandwidth_limit_tok_s
    if limit:
        s.add_row(
            f"bandwidth limit ({res.weights_bytes / 1e9:.2f} GB at {res.bandwidth_gb_s:.0f} GB/s)",
            "",
            f"{limit:,.1f}",
            f"{1e3 / limit:.3f}",
        )
    console.print(s)
