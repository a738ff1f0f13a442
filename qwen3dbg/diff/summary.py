"""The one-screen summary of a diff result in English, and each label's tone: what every view renders."""

from __future__ import annotations

from qwen3dbg.diff.result import DiffResult, TapResult, ref_error
from qwen3dbg.util.text import plural, short

#: the tone of each summary label, which each view turns into its own style (terminal colours, HTML classes);
#: a label not listed, and "verdict" and "sides" (each view styles those itself), is plain
TONE = {
    "first NaN/inf": "bad",
    "golden NaN/inf": "bad",
    "reference": "warn",
    "systematic": "warn",
    "routing ties": "warn",
    "note": "warn",
    "within noise": "info",
    "diagnosis": "hint",
    "or": "hint",
    "not compared": "quiet",
}


def summary(result: DiffResult) -> list[tuple[str, str]]:
    """The one-screen summary as (label, sentence) pairs in reading order; every view renders these."""
    ref, cand = result.side("ref"), result.side("cand")
    lines = [
        ("verdict", result.verdict),
        (
            "sides",
            f"Candidate {cand.spec} against reference {ref.spec} in {result.dtype}, on "
            f"{plural(result.steps[0]['tokens'], 'prompt token')} and "
            f"{plural(len(result.steps) - 1, 'decode step')}. Each side's error is measured against "
            "the readable reference (scratch) run in float64.",
        ),
    ]
    if result.stopped and result.first_divergence is not None:  # the verdict says it when nothing diverged
        lines.append(("not finished", result.stopped))
    lines += [("note", f"{s.role} {s.spec}: {n}") for s in result.sides for n in s.notes]
    if len(result.steps) == 1:
        how = (
            "capture the store with --decode-steps 4"
            if any(s.spec.startswith("store:") for s in result.sides)
            else "--decode-steps 4 checks them"
        )
        lines.append(
            (
                "note",
                f"prefill only: the KV cache and the decode path ran no step; {how} (a cache off "
                "by one shows only there)",
            )
        )
    suspect = result.suspect_reference
    if suspect is not None:
        lines.append(
            (
                "reference",
                f"the reference itself is {ref_error(suspect):.2g} rel. L2 from fp64 at step "
                f"{suspect.step}, {suspect.name}: tolerances follow its error, so it may hide "
                f"the candidate's bugs; {result.reference_check()}",
            )
        )
    gold = result.golden_nonfinite
    if gold:
        lines.append(
            (
                "golden NaN/inf",
                f"step {gold['step']}, {gold['tap']} ({gold['count']} values): "
                "neither side is judged where the golden is not finite",
            )
        )
    d = result.first_divergence
    if d is not None:
        shown = ("step", "batch", "token") if "position" in (d.worst or {}) else ("step", "batch")
        worst = ", ".join(f"{k} {v}" for k, v in (d.worst or {}).items() if k not in shown) or "-"
        lines.append(
            (
                "first divergence",
                f"step {d.step}, {d.tap}: rel. L2 {d.rel_l2:.3g}, max |err| {d.max_abs:.3g}, worst at {worst}",
            )
        )
        if d.origin:
            lines.append(("origin", d.origin["message"]))
        nf = result.first_nonfinite
        if nf:
            lines.append(("first NaN/inf", f"step {nf['step']}, {nf['tap']} ({nf['count']} values)"))
        lines += [
            ("diagnosis" if i == 0 else "or", f"{x.signature}: {x.message}") for i, x in enumerate(result.diagnosis)
        ]
        if not result.diagnosis and result.stopped:  # nothing was tried: memory was about to run out
            lines.append(("diagnosis", "not run: the run stopped before its end"))
        elif not result.diagnosis:
            lines.append(
                (
                    "diagnosis",
                    "nothing explains it: no hypothesis reproduces the candidate's tensor within the noise floor",
                )
            )
    story = decode_story(result)
    if story is not None and len(result.steps) > 2:
        lines.append(("decode steps", story))
    if result.in_noise is not None and suspect is None:  # "only rounding" is no comfort from a suspect floor
        lines.append(("within noise", f"step {result.in_noise.step}, {result.in_noise.tap}: {result.in_noise.message}"))
    if result.systematic is not None:
        lines.append(("systematic", f"step {result.systematic.step}: {result.systematic.message}"))
    if result.routing_ties:
        lines.append(
            (
                "routing ties",
                f"{plural(len(result.routing_ties), 'token')} chose other experts within the "
                "router noise; their later taps are left out",
            )
        )
    missing = sorted({t.op for t in result.not_compared})
    if missing:
        lines.append(("not compared", f"a side lacks {', '.join(missing)}"))
    return lines


def decode_story(result: DiffResult) -> str | None:
    """One sentence on the decode steps: clean throughout, or where the candidate leaves the noise floor
    and how far its error has grown by the last step."""
    decode = [r for r in result.step_summary if r["step"] > 0]
    if not decode:
        return None
    out = next((r for r in result.step_summary if r["divergent"]), None)
    last = decode[-1]
    if out is not None and out["step"] == 0:
        return (
            f"the prefill already diverges, so the decode steps start from it: by the last step "
            f"{last['step']}, {last['divergent']} of {last['compared']} taps over, worst "
            f"{last['worst_excess']:.3g}x"
        )
    if out is None:
        worst = max(decode, key=lambda r: r["worst_excess"])
        return (
            f"all {len(decode)} decode steps within the noise floor (closest: step {worst['step']}, "
            f"{worst['worst_tap']} at {worst['worst_excess']:.2g}x the tolerance)"
        )
    return (
        f"within the noise floor through step {out['step'] - 1}; from step {out['step']} on the candidate "
        f"leaves it ({out['worst_tap']} at {out['worst_excess']:.3g}x), by the last step {last['step']}: "
        f"{last['divergent']} of {last['compared']} taps over, worst {last['worst_excess']:.3g}x"
    )


def evidence(t: TapResult) -> str:
    """The statistic that sets the excess, the candidate's vs the reference's: what a reader checks the
    verdict by."""
    if t.status == "not_compared":
        return t.reason
    if t.op == "moe.topk_ids":
        return f"ids differ: {t.mismatch:.0%} of tokens" if t.mismatch else "ids as fp64's"
    if t.nonfinite.get("cand"):
        return f"{t.nonfinite['cand']} NaN/inf where fp64 is finite"
    if t.tol_abs and t.tol_rel and t.max_abs / t.tol_abs > t.rel_l2 / t.tol_rel:
        return f"max |err| {short(t.max_abs)} vs {short(t.ref_max_abs)}"
    return f"rel. L2 {short(t.rel_l2)} vs {short(t.ref_rel_l2)}"
