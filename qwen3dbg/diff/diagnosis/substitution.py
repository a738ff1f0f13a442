"""Operand substitution: the op replayed on another operand. Another checkpoint weight of the same shape
(this layer's other modules, the same module in a nearby layer, any norm weight), the weight transposed,
a bias left in the checkpoint; or another tap as input (this or the previous layer's, the previous step's,
any layer's KV cache), taken from the candidate where it holds it."""

from __future__ import annotations

import torch

from qwen3dbg.diff.diagnosis.hypothesis import (
    MATMUL_MODULE,
    NORM_OPS,
    Hypothesis,
    is_linear,
    linear_weight_name,
    norm_input,
    norm_weight_name,
    replay_floor,
    replay_rows,
)
from qwen3dbg.diff.diagnosis.replay import rms_norm
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
from qwen3dbg.model.layout import tensor_shapes
from qwen3dbg.diff.metrics import ranked, rel, sample
from qwen3dbg.tapstore.schema import layer_input, layer_ops, parse_tap_name, step_taps, tap_name

#: output channels a matmul replay looks at (an LM head has 152k)
OUT_CHANNELS = 512
_LAYER = "model.layers."


def _layer_of(weight: str) -> int | None:
    return int(weight.split(".")[2]) if weight.startswith(_LAYER) else None


def _module_of(weight: str) -> str:
    return ".".join(weight.split(".")[3:]) if weight.startswith(_LAYER) else weight


def _relation(s: Site, used: str, own: str) -> str:
    """How the weight a candidate used relates to the right one, in words."""
    layer = _layer_of(used)
    if _module_of(used) == _module_of(own) and layer is not None and s.layer is not None:
        return {s.layer - 1: "the previous layer's weight", s.layer + 1: "the next layer's weight"}.get(
            layer, f"layer {layer}'s weight"
        )
    return f"{_module_of(used)} in place of {_module_of(own)}"


def _candidates(s: Site, own: str, shape: tuple[int, ...], everywhere: bool) -> list[str]:
    """Checkpoint names of `shape` other than `own`: every layer's when `everywhere` (norm weights are tiny),
    else this layer's and its neighbours' modules, the same module in any layer, and the global ones."""
    near = {None} | ({s.layer - 1, s.layer, s.layer + 1} if s.layer is not None else {0, s.cfg.num_hidden_layers - 1})
    names = [
        n
        for n, sh in tensor_shapes(s.cfg).items()
        if tuple(sh) == tuple(shape)
        and n != own
        and (everywhere or _layer_of(n) in near or _module_of(n) == _module_of(own))
    ]
    return names + [
        n for n in ("lm_head.weight", "model.embed_tokens.weight") if n != own and n not in names and s.op == "logits"
    ]


def _stated(
    s: Site, used: str, own: str, transposed: bool, fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> Diagnosis | None:
    """`fit`: (the candidate's slice, the replay with `used`, the replay with `own`) on the same slice, both
    from the candidate's own operands."""
    c, replay, qwen3 = fit
    if transposed and used == own:
        return s.explained(
            "weight_transposed",
            f"{s.name()} applies {own} transposed",
            "the weight is used transposed; F.linear takes [out, in] as stored",
            replay,
            {"weight": own, "expected": own},
            cand=c,
            unchanged=qwen3,
            floor=replay_floor(s),
        )
    relation = _relation(s, used, own)
    if transposed:  # "layer 0's weight transposed", "o_proj.weight transposed in place of q_proj.weight"
        relation = (
            relation.replace(" in place of", " transposed in place of")
            if " in place of" in relation
            else relation + " transposed"
        )
    why = f"it loads {relation}"
    if s.op == "logits" and s.cfg.tie_word_embeddings and used == "lm_head.weight":
        why = "the LM head is not the embedding though tie_word_embeddings is true; use model.embed_tokens.weight"
    return s.explained(
        "weight_substituted",
        f"{s.name()} applies {used}" + (" transposed" if transposed else ""),
        f"{why}; load {own}",
        replay,
        {"weight": used, "expected": own, "transposed": transposed},
        cand=c,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


def norm_weight(s: Site) -> Diagnosis | None:
    """The norm replayed with every other norm weight of its shape."""
    x, own = norm_input(s), norm_weight_name(s)
    w = s.weight_at(own)
    if x is None or w is None:
        return None
    t = s.tokens()
    xhat, c = rms_norm(x[:, t], 1.0, s.cfg.rms_norm_eps), s.cand()[:, t]
    if rel(c, w * xhat) <= replay_floor(s):
        return None
    others = ((n, s.weight_at(n)) for n in _candidates(s, own, tuple(w.shape), True))
    tried = [(wn * xhat, n) for n, wn in others if wn is not None]
    if not tried:
        return None
    replay, used = min(tried, key=lambda t: ranked(rel(c, t[0])))
    return _stated(s, used, own, False, (c, replay, w * xhat))


def linear_weight(s: Site) -> Diagnosis | None:
    """The matmul replayed on sampled tokens and output channels with each weight of its shape (this layer's
    and its neighbours' modules, the same module in any layer), each weight of the transposed shape
    transposed, and its own weight transposed when square."""
    if not is_linear(s):
        return None
    x, own, c = s.operand(s.inputs[0]), linear_weight_name(s), s.cand()
    rows = sample(c.shape[-1], OUT_CHANNELS)
    w = s.weight_at(own, rows)
    if x is None or w is None:
        return None
    x, c = x[:, s.tokens()], c[:, s.tokens()][..., rows]
    qwen3 = x @ w.T
    if rel(c, qwen3) <= replay_floor(s):
        return None
    shape = s.weight_shape(own)
    tried = []
    for n in _candidates(s, own, shape, False):
        if (wn := s.weight_at(n, rows)) is not None:
            tried.append((x @ wn.T, n, False))
    for n in _candidates(s, own, shape[::-1], False) + ([own] if shape[0] == shape[1] else []):
        if s.weight_shape(n) == shape[::-1] and (wn := s.weight_at(n)) is not None:  # [in, out] as [out, in]
            tried.append((x @ wn[:, rows], n, True))
    if not tried:
        return None
    replay, used, transposed = min(tried, key=lambda t: ranked(rel(c, t[0])))
    return _stated(s, used, own, transposed, (c, replay, qwen3))


def extra_bias(s: Site) -> Diagnosis | None:
    """cand - reference is the same vector at every token; named after an unused checkpoint bias it equals."""
    c, r = s.cand(), s.base()
    d = (c - r).reshape(-1, c.shape[-1])  # [tokens, N]
    if d.shape[0] < 2 or rel(c, r) <= s.tol:
        return None
    offset = d.mean(0)
    rms = float(offset.pow(2).mean().sqrt())
    spread = float(torch.linalg.vector_norm(d - offset) / torch.linalg.vector_norm(d))
    if spread > 0.1:  # fitted from the tokens themselves: it must leave them a tenth of the difference
        return None
    ev = {"offset_rms": rms, "spread_across_tokens": spread, "tokens": d.shape[0]}
    what = f"{s.name()} = reference + a constant per-channel offset (rms {rms:.3g})"
    why = "an extra bias"
    bias_name = s.weight_name(f"{MATMUL_MODULE.get(s.op, s.op)}.bias")
    bias = s.weight_at(bias_name)
    if bias is not None and bias.shape == offset.shape and rel(offset, bias) < 0.05:
        offset = bias
        ev |= {"bias_tensor": bias_name, "offset_vs_bias_rel": rel(d.mean(0), bias)}
        why += (
            f"; it equals the checkpoint's {bias_name}, which attention_bias "
            f"{str(s.cfg.attention_bias).lower()} leaves unused"
        )
    return s.explained("extra_bias", what, why, r + offset, ev)


# ---- another tap as input --------------------------------------------------------------------------


def _alternatives(s: Site, slot: int) -> list[tuple[str, int]]:
    """(name, step) of taps that could stand in for input `slot`: the same number of elements, from this
    layer and the previous one at this step and this layer at the previous step; any layer's cache for a cache."""
    right = s.inputs[slot]
    _, right_op = parse_tap_name(right)
    info = s.src.steps[s.step]
    specs = step_taps(s.cfg, len(info.token_ids), info.tokens, 1)
    if right_op in ("k_cache", "v_cache"):
        found = [(tap_name(right_op, i), s.step) for i in range(s.cfg.num_hidden_layers)]
    else:
        near = {s.layer, s.layer - 1} if s.layer is not None else {s.cfg.num_hidden_layers - 1}
        found = [(t.name, s.step) for t in specs if t.layer in near or (t.layer is None and t.op == "embed")]
        if s.step and s.layer is not None:
            found += [(tap_name(o.op, s.layer), s.step - 1) for o in layer_ops(s.cfg, s.layer)]
    return [(n, st) for n, st in found if (n, st) != (right, s.step) and n != s.name()]


def input_substituted(s: Site) -> Diagnosis | None:
    """The op replayed with one input replaced by another tap of as many elements (attn_out also with both
    of its caches' layer replaced when the candidate shows no probabilities), on the tokens a fit looks at
    (`Site.fit_rows`) when the tap is large."""
    ins = [s.operand(n) for n in s.inputs]
    if any(t is None for t in ins):
        return None
    rows = s.fit_rows(s.cand())
    c, qwen3 = s.pick(s.cand(), rows), replay_rows(s, ins, rows)
    if qwen3 is None or rel(c, qwen3) <= replay_floor(s):
        return None
    tried = []
    for slot, right in enumerate(ins):
        for name, step in _alternatives(s, slot):
            alt = s.operand(name, step)
            if alt is None or alt.numel() != right.numel() or alt.dtype != right.dtype:
                continue
            hyp = replay_rows(s, ins[:slot] + [alt.reshape(right.shape)] + ins[slot + 1 :], rows)
            if hyp is not None and hyp.shape == c.shape:
                tried.append((hyp, slot, name, step))
    if not tried:
        return None
    replay, slot, name, step = min(tried, key=lambda t: ranked(rel(c, t[0])))
    right = s.inputs[slot]
    used = name + (f" of step {step}" if step != s.step else "")
    why = f"it reads {used} in place of {right}"
    _, used_op = parse_tap_name(name)
    if s.op in ("resid_mid", "resid_out") and used_op in ("attn_norm", "mlp_norm"):
        why = "the residual is taken from the normalised input instead of the raw one"
    elif s.op == "resid_out" and step == s.step and s.layer is not None and name == layer_input(s.layer):
        why = "the MLP's output is added to the layer's input, so the attention's sum is dropped"
    elif s.op in ("k_cache", "v_cache") and used_op in ("k_norm", "k_proj"):
        why = "the keys are cached before RoPE; cache k_rope"
    elif used_op == parse_tap_name(right)[1] and step == s.step:
        why = f"layer {s.layer} reads layer {parse_tap_name(name)[0]}'s {used_op}"
    return s.explained(
        "input_substituted",
        f"{s.name()} is computed from {used} where Qwen3 uses {right}",
        f"{why}; feed it {right}",
        replay,
        {"operand": name, "operand_step": step, "expected": right},
        cand=c,
        unchanged=qwen3,
        floor=replay_floor(s),
    )


HYPOTHESES = (
    Hypothesis(("extra_bias",), tuple(MATMUL_MODULE), extra_bias),
    Hypothesis(("weight_substituted",), NORM_OPS, norm_weight),
    Hypothesis(("weight_substituted", "weight_transposed"), tuple(MATMUL_MODULE), linear_weight),
    Hypothesis(
        ("input_substituted",),
        NORM_OPS + tuple(MATMUL_MODULE) + ("resid_mid", "resid_out", "k_cache", "v_cache", "attn_scores", "attn_out"),
        input_substituted,
    ),
)
