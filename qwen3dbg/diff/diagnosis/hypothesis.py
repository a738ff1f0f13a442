"""What every family module declares: a hypothesis, the ids it may report and the ops it can explain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwen3dbg.diff.diagnosis.replay import context, rms_norm, rope_angles, rotate, scores, softmax
from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
from qwen3dbg.reference.qwen3 import swiglu
from qwen3dbg.tapstore.schema import OPS_BY_NAME

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


def replay_op(s: Site, ins: list[torch.Tensor]) -> torch.Tensor | None:
    """This op, the Qwen3 way, on inputs `ins` (shaped as its schema inputs), on all tokens; None for ops
    not replayed here (the logits: a full LM head in float64 is too large to replay whole)."""
    op, c = s.op, s.cand()
    if op in NORM_OPS:
        w = s.weight_at(norm_weight_name(s))
        return None if w is None else rms_norm(ins[0].reshape(c.shape), w, s.cfg.rms_norm_eps)
    if is_linear(s) and s.op != "logits":
        w = s.weight_at(linear_weight_name(s))
        return None if w is None else ins[0] @ w.T
    if op in ("resid_mid", "resid_out"):
        return ins[0] + ins[1]
    if op in ("q_rope", "k_rope"):
        return rotate(ins[0], rope_angles(s.positions(), s.cfg.head_dim, s.cfg.rope_theta, False))
    if op in ("k_cache", "v_cache"):
        new = ins[0].reshape(c.shape[0], -1, c.shape[1], c.shape[3]).transpose(1, 2)  # [B,nKV,T,D]
        past = s.cand(step=s.step - 1) if s.step else None
        if s.step and past is None:
            return None
        return new if past is None else torch.cat((past, new), 2)
    if op == "attn_scores":
        return scores(ins[0], ins[1], s.positions(), s.kv_of_head, s.cfg.head_dim**-0.5)
    if op == "attn_probs":
        return softmax(ins[0])
    if op == "attn_out":
        return context(ins[0], ins[1], s.kv_of_head)
    if op == "mlp.act":
        return swiglu(ins[0], ins[1])
    return None
