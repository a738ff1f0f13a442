"""Introduced or inherited: does the first divergent op create the error, or carry it in from its inputs?

With a candidate that can run one layer, teacher forcing feeds the reference's input of that layer
(and its KV cache, from the diff's window) into the candidate's layer and measures what the layer alone
adds. A store cannot run, so there the answer is estimated from the jump in error between the op's
inputs and its output.
"""

from __future__ import annotations

import torch

from qwen3dbg.diff.metrics import rel
from qwen3dbg.diff.result import Divergence, TapResult
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.run.candidate import Candidate, DictSink
from qwen3dbg.tapstore.schema import inputs_of, layer_input, tap_name
from qwen3dbg.tapstore.store import StepInfo, masked


def estimate(div: Divergence, by_name: dict[str, TapResult], cfg: Qwen3Config) -> dict:
    """Error jump of the op: its inputs' largest excess over the noise floor vs its own."""
    ins = [by_name[n] for n in inputs_of(div.tap, cfg) if n in by_name and by_name[n].status == "ok"]
    worst_in = max((t.excess for t in ins), default=0.0)
    introduced = worst_in <= 1 < div.excess
    names = ", ".join(t.name for t in ins) or "none"
    how = (
        f"{div.op} introduced the error: its output is {div.excess:.3g}x over the noise floor while its inputs "
        f"({names}) are at most {worst_in:.2g}x"
        if introduced
        else f"inherited: the inputs of {div.op} ({names}) are already {worst_in:.2g}x over the noise floor"
    )
    return {
        "introduced": introduced,
        "method": "error jump",
        "input_excess": worst_in,
        "output_excess": div.excess,
        # teacher forcing replaces this where it can; a store, a port without run_layer, a tap outside
        # the layers cannot be rerun alone
        "message": f"{how} (estimated from the error jump: the layer was not rerun alone on the reference's input)",
    }


def teacher_force(cand: Candidate, src, div: Divergence, res: TapResult, info: StepInfo) -> dict | None:
    """Run the candidate's layer `div.layer` on the reference's layer input and cache (read from the diff's
    window, `src`); None when it cannot."""
    layer, s = div.layer, div.step
    if layer is None or not cand.supports_layer:
        return None
    hidden, r, g = src.ref(s, layer_input(layer)), src.ref(s, div.tap), src.gold(s, div.tap)
    past = None
    if s:  # the cache before this step: the step's own cache less the slots it wrote
        caches = [src.ref(s, tap_name(op, layer)) for op in ("k_cache", "v_cache")]
        if any(c is None for c in caches):
            return None
        past = tuple(c[:, :, : c.shape[2] - info.tokens].to(cand.dtype) for c in caches)
    if hidden is None or r is None or g is None:
        return None
    sink = DictSink(only={div.tap})
    cand.reset()
    cand.run_layer(layer, hidden.to(cand.dtype), torch.tensor(info.positions), past, sink)
    forced = sink.taps.get(div.tap)
    if forced is None or forced.shape != r.shape:
        return None
    ok = torch.isfinite(g) & torch.isfinite(r) & ~masked(g) & ~masked(r)
    mask_diff = int((masked(forced) != masked(r)).sum())
    alone = float("inf") if mask_diff else rel(forced, r, scale=g, where=ok)
    introduced = alone > res.tol_rel
    what = (
        f"its attention mask differs at {mask_diff} entries"
        if mask_diff
        else f"{div.op} is {alone:.3g} rel. L2 off, against a tolerance of {res.tol_rel:.3g}"
    )
    message = (
        f"layer {layer} introduced the error: run on the reference's own input, the candidate's layer "
        f"{layer} alone already goes wrong; {what}"
        if introduced
        else f"inherited from before layer {layer}: run on the reference's own input, the candidate's layer "
        f"{layer} stays within the noise; {what}. The error comes in with the layer's input"
    )
    return {
        "introduced": introduced,
        "method": "teacher forcing",
        "alone_rel_l2": alone,
        "full_rel_l2": res.rel_l2,
        "tol_rel": res.tol_rel,
        "mask_entries": mask_diff,
        "message": message,
    }
