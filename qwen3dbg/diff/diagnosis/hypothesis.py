"""What every family module declares: a hypothesis, the ids it may report and the ops it can explain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from qwen3dbg.diff.diagnosis.replay import context, rms_norm, rope_angles, rotate, scores, softmax
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
from qwen3dbg.diff.metrics import rel
from qwen3dbg.diff.noise import NORM_FACTOR, REL_FLOOR_ULPS
from qwen3dbg.reference.qwen3 import swiglu
from qwen3dbg.tapstore.schema import OPS_BY_NAME, parse_tap_name

Check = Callable[[Site], "Diagnosis | None"]

NORM_OPS = ("attn_norm", "q_norm", "k_norm", "mlp_norm", "final_norm")
#: each norm tap's weight, from the schema
NORM_WEIGHT = {op: OPS_BY_NAME[op].module + ".weight" for op in NORM_OPS}
#: matmul taps and the checkpoint module holding their weight (and any bias a converter left beside it)
MATMUL_MODULE = {
    op: OPS_BY_NAME[op].module
    for op in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "mlp.up", "mlp.out", "moe.router_logits", "logits")
}


@dataclass(frozen=True)
class Hypothesis:
    """A testable explanation: the stable ids it may report (what JSON consumers match on), the ops whose
    divergence it can explain ("*": any), and the check that replays it. Checks of non-finite values run
    only where the candidate has NaN/inf that the reference has not; all the others only where it has none."""

    ids: tuple[str, ...]
    ops: tuple[str, ...]
    check: Check
    nonfinite: bool = False


def norm_input(s: Site):
    """The candidate's input of a norm tap (which may sit in the previous layer), shaped like its output."""
    c, x = s.cand(), s.operand(s.inputs[0])
    return None if x is None or c is None else x.reshape(c.shape)


def norm_weight_name(s: Site) -> str:
    return s.weight_name(NORM_WEIGHT[s.op])


def is_linear(s: Site) -> bool:
    """A tap that is one matmul of its input with one checkpoint weight (not a MoE layer's mixture)."""
    return s.op in MATMUL_MODULE and not (s.op == "mlp.out" and s.cfg.is_moe_layer(s.layer))


def linear_weight_name(s: Site) -> str:
    if s.op == "logits":
        return "model.embed_tokens.weight" if s.cfg.tie_word_embeddings else "lm_head.weight"
    return s.weight_name(MATMUL_MODULE[s.op] + ".weight")


def replay_op(s: Site, ins: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """This op, the Qwen3 way, on inputs `ins` (shaped as its schema inputs), on all tokens, or on the tokens
    `rows` when `ins` hold only those (`replay_rows`); None for ops not replayed here (the logits: a full LM
    head in float64 is too large to replay whole)."""
    op, c = s.op, s.cand()
    pos = s.positions(rows)
    if op in NORM_OPS:
        w = s.weight_at(norm_weight_name(s))
        x = ins[0].reshape(*ins[0].shape[:2], *c.shape[2:])  # q_norm's input, [B,T,nH*D], per head
        return None if w is None else rms_norm(x, w, s.cfg.rms_norm_eps)
    if is_linear(s) and s.op != "logits":
        w = s.weight_at(linear_weight_name(s))
        return None if w is None else ins[0] @ w.T
    if op in ("resid_mid", "resid_out"):
        return ins[0] + ins[1]
    if op in ("q_rope", "k_rope"):
        return rotate(ins[0], rope_angles(pos, s.cfg.head_dim, s.cfg.rope_theta, False))
    if op in ("k_cache", "v_cache"):
        assert rows is None, "a cache holds every position"
        new = ins[0].reshape(c.shape[0], -1, c.shape[1], c.shape[3]).transpose(1, 2)  # [B,nKV,T,D]
        past = s.cand(step=s.step - 1) if s.step else None
        if s.step and past is None:
            return None
        return new if past is None else torch.cat((past, new), 2)
    if op == "attn_scores":
        return scores(ins[0], ins[1], pos, s.kv_of_head, s.cfg.head_dim**-0.5)
    if op == "attn_probs":
        return softmax(ins[0])
    if op == "attn_out":
        return context(ins[0], ins[1], s.kv_of_head)
    if op == "mlp.act":
        return swiglu(ins[0], ins[1])
    return None


def on_rows(s: Site, ins: list[torch.Tensor], rows: torch.Tensor | None) -> list[torch.Tensor]:
    """The operands of this op (shaped as its schema inputs) on the tokens `rows` only (None: all): each picked
    on its tokens axis, a key or value cache left whole (every query row reads all of it)."""
    if rows is None:
        return ins
    axes = [OPS_BY_NAME[parse_tap_name(n)[1]].axes for n in s.inputs]
    return [x if "T" not in a else x.index_select(a.index("T"), rows) for x, a in zip(ins, axes)]


def replay_rows(s: Site, ins: list[torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor | None:
    """This op replayed from its operands on all tokens, on the tokens `rows` only (None: all): a large tap's
    replay costs what its sampled rows cost (every op replayed here computes each token's row on its own)."""
    return replay_op(s, on_rows(s, ins, rows), rows)


#: the tokens an op's own rounding is measured on (`replay_floor`)
FLOOR_TOKENS = 64


def replay_floor(s: Site) -> float:
    """The noise floor of a replay from the candidate's own operands, held against the same replay unedited:
    it carries none of the noise upstream of the op (the tap's floor, `Site.tol`, which grows with the prompt:
    attention over more keys in low precision), only the op's own rounding. That is measured on the reference,
    its tap against the op replayed on its own operands (on sampled tokens),
    times NORM_FACTOR for another rounding order, never under REL_FLOOR_ULPS ulps, never over the tap's floor.
    The tap's floor where the candidate does not hold every operand or the op is not replayed here."""
    if "replay_floor" not in s.memo:
        floor, r = s.tol, s.base()
        ins = [s.get("base", n) for n in s.inputs]
        own = all(s.get("cand", n) is not None for n in s.inputs)
        if own and r is not None and all(t is not None for t in ins):
            rows = s.tokens(FLOOR_TOKENS) if "T" in OPS_BY_NAME[s.op].axes else None
            r, replay = s.pick(r, rows), replay_rows(s, ins, rows)
            if replay is not None and replay.shape == r.shape:
                noise = rel(r, replay)
                if math.isfinite(noise):
                    floor = min(floor, max(NORM_FACTOR * noise, REL_FLOOR_ULPS * s.eps))
        s.memo["replay_floor"] = floor
    return s.memo["replay_floor"]
