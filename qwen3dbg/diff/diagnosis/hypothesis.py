"""What every family module declares: a hypothesis, the ids it may report and the ops it can explain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qwen3dbg.diff.diagnosis.site import Diagnosis, Site
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
