"""The in-noise finding of a diff: the rounding difference, below the divergence rule, that a porter most needs
named, followed while the comparison streams."""

from __future__ import annotations

import torch

from qwen3dbg.diff.result import Finding, TapResult
from qwen3dbg.diff.window import Window, WindowSource
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import inputs_of
from qwen3dbg.util.dtypes import dtype_name

#: an in-noise difference worth reporting: at least this many ulps (rms) apart from the reference ...
IN_NOISE_MIN_ULPS = 0.25
#: ... ranked by how much it exceeds its inputs' difference, counted as at least this many ulps
IN_NOISE_CARRIED_ULPS = 0.05


class InNoise:
    """The in-noise difference that most exceeds what its inputs carry (before any divergence), followed as
    the comparison streams: among taps differing from the reference by at least IN_NOISE_MIN_ULPS (rms) and
    by more than their inputs do (an input difference below IN_NOISE_CARRIED_ULPS counts as that much), the
    largest ratio of the two, times what magnifies a rounding there (an RMSNorm's largest weight, e.g.
    k_norm ~96.5: porters need that rounding point named, not the first one met). The window keeps the
    tensors of the best so far."""

    def __init__(self, cfg: Qwen3Config, src: WindowSource, window: Window):
        self.cfg, self.src, self.window = cfg, src, window
        self.best: TapResult | None = None
        self.best_rank, self.best_in, self.done = 0.0, 0.0, False
        self.step: dict[str, TapResult] = {}
        self.amplification: dict[str, float] = {}

    def add(self, r: TapResult) -> None:
        if self.done or r.divergent:
            self.done = True
            return
        if self.step and next(iter(self.step.values())).step != r.step:
            self.step = {}
        self.step[r.name] = r
        if r.status != "ok" or r.diff_ulps < IN_NOISE_MIN_ULPS:
            return
        inputs = inputs_of(r.name, self.cfg)
        carried = max((self.step[n].diff_ulps for n in inputs if n in self.step), default=0.0)
        own = r.diff_ulps / max(carried, IN_NOISE_CARRIED_ULPS)
        if own > 1.0 and (rank := own * self._amplification(r.name)) > self.best_rank:
            self.best, self.best_rank, self.best_in = r, rank, carried
            self.window.snapshot(r.step, [r.name, *inputs])

    def _amplification(self, name: str) -> float:
        from qwen3dbg.diff.diagnosis import amplification

        if name not in self.amplification:
            self.amplification[name] = amplification(self.src, name)
        return self.amplification[name]

    def finding(self, dt: torch.dtype) -> Finding | None:
        from qwen3dbg.diff.diagnosis import explain_rounding

        best = self.best
        if best is None:
            return None
        src = WindowSource(self.cfg, self.src.steps, self.src.dtype, self.src.model, self.window.noise)
        explained = explain_rounding(src, best.step, best.name)
        if explained is not None:
            return Finding(
                best.step,
                best.name,
                best.diff_ulps,
                self.best_in,
                explained.message,
                explained.signature,
                dict(explained.evidence),
            )
        return Finding(
            best.step,
            best.name,
            best.diff_ulps,
            self.best_in,
            f"{best.name} differs from the reference by {best.diff_ulps:.2g} {dtype_name(dt)} ulps (rms) "
            f"while its inputs differ by {self.best_in:.2g}, within the noise floor; no replay stated a cause",
            "in_noise",
            {"diff_ulps": best.diff_ulps, "input_ulps": self.best_in},
        )
