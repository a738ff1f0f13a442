"""Where a hypothesis looks: the divergent tap of one step, its neighbours, the checkpoint, its noise.

Every read goes through `Site`, widened to float64 once and cached: a hypothesis asks only for the taps
it needs, and a tap the TapSource does not hold (outside the window a streaming diff keeps) is None, on
which the hypothesis steps aside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.diff.fused import tap_errors
from qwen3dbg.diff.noise import NORM_FACTOR, REL_FLOOR_ULPS, tolerance
from qwen3dbg.util.dtypes import dtype_name
from qwen3dbg.diff.metrics import rel, sample
from qwen3dbg.tapstore.store import StepInfo, masked
from qwen3dbg.tapstore.schema import OPS_BY_NAME, forward_index, inputs_of, parse_tap_name, tap_name

#: the most tokens and heads a fit or a replay looks at
FIT_TOKENS, FIT_HEADS = 16, 4
#: the most elements a fit on a whole tap looks at: a larger tap (the logits, a long prompt's attention) is
#: fitted on some of its tokens (`Site.fit_rows`), those where the error lives among them
FIT_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Diagnosis:
    signature: str  # stable id
    message: str  # one sentence: the mechanism, what it leaves unexplained, the fix
    evidence: dict = field(default_factory=dict)  # JSON-serialisable numbers behind the message


class TapSource(Protocol):
    """What the differ hands in: every side's taps by (step, name), and the checkpoint. A tap outside
    what the source holds is None; golden tensors may come in float32 for low-precision runs."""

    config: Qwen3Config
    steps: list[StepInfo]
    dtype: torch.dtype  # dtype under test

    def ref(self, step: int, name: str) -> torch.Tensor | None: ...

    def cand(self, step: int, name: str) -> torch.Tensor | None: ...

    def gold(self, step: int, name: str) -> torch.Tensor | None: ...

    def weight(self, name: str) -> torch.Tensor | None: ...


def widen(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tap in float64, its masked attention entries as -inf (their canonical form): an additive mask
    stored as finfo(dtype).min would no longer read as masked once widened."""
    if t is None:
        return None
    return t.masked_fill(masked(t), float("-inf")).double() if t.is_floating_point() else t.double()


def floors(x: float) -> str:
    """How a residual in units of the noise floor reads in a message."""
    return f"{x:.2g}x the noise floor" if x >= 0.01 else "under 0.01x the noise floor"


def ulps_phrase(n: float, dtype_name: str) -> str:
    """`n` ulps in words, for a difference that exists: never "0 ulps" (under half an ulp says so)."""
    if not n >= 0.5:
        return f"less than half a {dtype_name} ulp"
    return f"{n:.0f} {dtype_name} ulp" + ("" if round(n) == 1 else "s")


@dataclass
class Site:
    """One tap of one step under suspicion, with its neighbours (by op in the same layer, or by name)."""

    src: TapSource
    step: int
    layer: int | None
    op: str
    #: (side, step, name) -> widened tensor: hypotheses read the same few taps, each from the source once
    _reads: dict = field(default_factory=dict, init=False, repr=False)
    _weights: dict = field(default_factory=dict, init=False, repr=False)
    #: what hypotheses of this site share once computed (`hypothesis.replay_floor`)
    memo: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def cfg(self) -> Qwen3Config:
        return self.src.config

    @property
    def eps(self) -> float:
        return torch.finfo(self.src.dtype).eps

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.src.dtype)

    def name(self, op: str | None = None, layer: int | None | str = "same") -> str:
        return tap_name(op or self.op, self.layer if layer == "same" else layer)

    @cached_property
    def _order(self) -> dict[str, int]:
        return forward_index(self.cfg)

    def before(self, name: str, step: int) -> bool:
        """Whether tap `name` of `step` exists when this op runs (data flow): an earlier step's, or one
        computed earlier in this step's forward order. The tap under suspicion itself counts, as what is
        explained, never as an operand (`operand` refuses it)."""
        if step != self.step:
            return 0 <= step < self.step
        here, there = self._order.get(self.name()), self._order.get(name)
        return here is not None and there is not None and there <= here

    def get(self, side: str, name: str, step: int | None = None) -> torch.Tensor | None:
        """A tap by full name: side "cand", or "base" (the reference in the dtype under test, else the golden).
        None for a tap computed after this op: no replay may read the future."""
        key = (side, self.step if step is None else step, name)
        if not self.before(name, key[1]):
            return None
        if key not in self._reads:
            if side == "cand":
                t = self.src.cand(key[1], name)
            else:
                t = self.src.ref(key[1], name)
                t = self.src.gold(key[1], name) if t is None else t
            self._reads[key] = widen(t)
        return self._reads[key]

    def cand(self, op: str | None = None, step: int | None = None) -> torch.Tensor | None:
        return self.get("cand", self.name(op), step)

    def base(self, op: str | None = None, step: int | None = None) -> torch.Tensor | None:
        return self.get("base", self.name(op), step)

    def operand(self, name: str, step: int | None = None) -> torch.Tensor | None:
        """What the candidate fed an op: its own tap, else the reference's (within the noise before the
        divergence); never the tap under suspicion itself (a replay that returns it proves nothing)."""
        if name == self.name() and (step is None or step == self.step):
            return None
        t = self.get("cand", name, step)
        return self.get("base", name, step) if t is None else t

    @cached_property
    def tol(self) -> float:
        """The noise floor a hypothesis must reach, the differ's own norm-wise rule: NORM_FACTOR x the
        reference's relative error to fp64 at this tap, never under REL_FLOOR_ULPS ulps of the dtype."""
        r, g = self.src.ref(self.step, self.name()), self.src.gold(self.step, self.name())
        noise = 0.0  # nothing compared: the floor alone
        if r is not None and g is not None and r.shape == g.shape:
            alone = tap_errors(g, r, r, scores=self.op == "attn_scores")
            noise = alone.ref.rel_l2 if alone.count else 0.0
        return max(NORM_FACTOR * noise, REL_FLOOR_ULPS * self.eps)

    def divergent(self) -> bool:
        """Whether the candidate's tap is past the differ's rule (True when the golden is not at hand):
        a tap within the noise has nothing for a hypothesis to explain (`explain_rounding` words it).
        Judged by the differ's own fused pass over the tap, which widens nothing."""
        name = self.name()
        c, r, g = (get(self.step, name) for get in (self.src.cand, self.src.ref, self.src.gold))
        if r is None or g is None or c is None or not c.shape == r.shape == g.shape:
            return True
        scores = self.op == "attn_scores"
        te = tap_errors(g, r, c, scores=scores)
        if not te.count or te.mask_diff or te.nonfinite["cand"]:  # the differ compares masks too
            return True
        r_rel, r_max = te.ref.rel_l2, te.ref.max_abs
        if self.step > 0:  # as the differ does at a decode step: the prefill's noise of the op pools in
            r0, g0 = self.src.ref(0, name), self.src.gold(0, name)
            if r0 is not None and g0 is not None and r0.shape == g0.shape:
                te0 = tap_errors(g0, r0, r0, scores=scores)
                if te0.count:
                    r_rel, r_max = max(r_rel, te0.ref.rel_l2), max(r_max, te0.ref.max_abs)
        tol = tolerance(self.src.dtype, r_rel, r_max, te.gold_max, te.count)
        return tol.excess(te.cand.rel_l2, te.cand.max_abs) > 1

    def floors(self, resid: float) -> float:
        """A relative residual in units of the noise floor."""
        return resid / self.tol

    def explained(
        self,
        signature: str,
        what: str,
        why: str,
        replay: torch.Tensor,
        evidence: dict | None = None,
        *,
        cand: torch.Tensor | None = None,
        unchanged: torch.Tensor | None = None,
        floor: float | None = None,
    ) -> Diagnosis | None:
        """The one gate every replayed hypothesis goes through: its finding, or None unless it proves
        something. `replay` is the op recomputed with the edit, `unchanged` the same replay without it (default:
        the reference's tap), `cand` what both are compared with (default: the candidate's tap; a slice of it
        needs its `unchanged`). Stated only when the replay reproduces the candidate within the noise floor
        (NaN/inf where the candidate is finite, or nothing to compare, is no fit), the unchanged replay does not,
        and the edit moves the replay out of the noise of the unchanged one (an edit that would explain the
        reference side as well distinguishes nothing). The noise is `floor` for all three, by default the tap's
        (`tol`); `hypothesis.replay_floor` where `replay` and `unchanged` are both replayed from the candidate's
        own operands."""
        assert cand is None or unchanged is not None, "a replay on a slice needs its unchanged replay"
        assert floor is None or unchanged is not None, "a replay's own floor holds against its unchanged replay"
        c = self.cand() if cand is None else cand
        unchanged = self.base() if unchanged is None else unchanged
        floor = self.tol if floor is None else floor
        resid = rel(c, replay)
        x = resid / floor
        if not x <= 1 or not rel(c, unchanged) > floor or not rel(replay, unchanged) > floor:
            return None
        return Diagnosis(
            signature,
            f"{what} (residual {floors(x)}): {why}",
            (evidence or {}) | {"residual": resid, "residual_in_noise": x},
        )

    def fit_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """Tokens of this op's tap `t` (on its "T" axis) a fit looks at when the tap is too large to fit on
        whole (None: it is not): half spread over the step, half the tokens where the candidate is farthest
        from the reference relative to the row's size, so that the rows where the error lives are among them."""
        axes = OPS_BY_NAME[self.op].axes
        if t.numel() <= FIT_ELEMENTS or "T" not in axes:
            return None
        key = ("fit_rows", t.numel())  # hypotheses of a large tap ask for the same rows
        if key not in self.memo:
            self.memo[key] = self._worst_rows(t, axes.index("T"))
        return self.memo[key]

    def _worst_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        c, b = self.cand(), self.base()
        n, others = c.shape[dim], [i for i in range(c.dim()) if i != dim]
        k = min(n, max(2, FIT_ELEMENTS * n // t.numel()))
        d = c - b
        ok = torch.isfinite(d)
        err = d.where(ok, 0.0).pow(2).sum(others) / b.where(ok, 0.0).pow(2).sum(others).clamp_min(
            torch.finfo(d.dtype).tiny
        )
        return torch.cat([sample(n, k - k // 2), err.topk(k // 2).indices]).unique()

    def pick(self, t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """This op's tap `t` on the tokens `rows` only (None: all)."""
        return t if rows is None else t.index_select(OPS_BY_NAME[self.op].axes.index("T"), rows)

    def positions(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The step's positions [B,T], on the tokens `rows` only (None: all)."""
        pos = torch.tensor(self.src.steps[self.step].positions)
        return pos if rows is None else pos[:, rows]

    def tokens(self, n: int | None = None) -> torch.Tensor:
        """Token indices a replay looks at: a spread sample, the first and last included."""
        return sample(self.positions().shape[1], n or FIT_TOKENS)

    @property
    def kv_of_head(self) -> list[int]:
        """Qwen3's GQA mapping: query head h reads kv head h // n_rep."""
        return [h // self.cfg.n_rep for h in range(self.cfg.num_attention_heads)]

    @property
    def inputs(self) -> list[str]:
        """Tap names this op reads, from the schema's graph."""
        return inputs_of(self.name(), self.cfg)

    @property
    def input_op(self) -> str:
        """The op this tap reads first, within the same layer."""
        return parse_tap_name(self.inputs[0])[1]

    def weight_name(self, module: str, layer: int | None | str = "same") -> str:
        """The on-disk name of a layer's `module` tensor (`self_attn.q_norm.weight`)."""
        layer = self.layer if layer == "same" else layer
        return f"model.layers.{layer}.{module}" if layer is not None else module

    def _raw(self, name: str) -> torch.Tensor | None:
        if name not in self._weights:
            self._weights[name] = self.src.weight(name)
        return self._weights[name]

    def weight_at(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """A checkpoint tensor in float64, or only its `rows` (an LM head in float64 would be 1.2 GB)."""
        t = self._raw(name)
        return None if t is None else (t if rows is None else t[rows]).double()

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        t = self._raw(name)
        return None if t is None else tuple(t.shape)

    def weight(self, module: str) -> torch.Tensor | None:
        return self.weight_at(self.weight_name(module))
