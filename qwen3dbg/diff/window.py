"""What outlives a streaming comparison: the tensors around the first divergence, which teacher forcing, the
diagnosis and the in-noise explanation read after the verdict, when the sides' taps are gone."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3dbg.diff.blocks import RowBlocks
from qwen3dbg.diff.streams import CACHE_OPS, CacheSlots, QueryRows
from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import ModelDir
from qwen3dbg.tapstore.schema import TapSpec
from qwen3dbg.tapstore.store import StepInfo

ROLES = ("gold", "ref", "cand")


@dataclass
class Window:
    """Collects the window while the comparison streams: a rolling buffer of the current step, frozen at
    the end of the first divergent layer."""

    keep_dtype: torch.dtype  # the golden's dtype in the window
    live: dict = field(default_factory=dict)  # (role, step, name) -> value, the current step
    previous: dict = field(default_factory=dict)  # the step before, when it decoded one token
    frozen: dict | None = None
    noise: dict = field(default_factory=dict)  # the in-noise explanation's taps
    _step: int = -1
    _tokens: int = 0
    _layer: int | None = None
    _pending: tuple[int, int | None] | None = None  # (step, layer) of the first divergence, until frozen

    def add(self, info: StepInfo, spec: TapSpec, divergent: bool, values: dict) -> None:
        if self.frozen is not None:
            return
        if info.step != self._step:
            if self._pending is not None:
                self._freeze()
                return
            self.previous = self._kept({k: v for k, v in self.live.items() if self._tokens == 1 or _is_cache(k[2])})
            self.live, self._step, self._tokens, self._layer = {}, info.step, info.tokens, None
        if self._pending is not None and spec.layer != self._pending[1]:
            self._freeze()
            return
        if spec.layer is not None and spec.layer != self._layer:
            self._prune(spec.layer)
            self._layer = spec.layer
        elif spec.layer is None and self._layer is not None:  # past the layers: the tail reads the last as its input
            self._prune(self._layer + 1)
            self._layer = None
        for role in ROLES:
            v = values[role]
            if v is not None:
                self.live[(role, info.step, spec.name)] = v
        if divergent and self._pending is None:
            self._pending = (info.step, spec.layer)

    def finish(self) -> None:
        """The comparison ended: a divergence in the last layer or the tail freezes now."""
        if self.frozen is None and self._pending is not None:
            self._freeze()

    def snapshot(self, step: int, names: list[str]) -> None:
        """Keep these taps of the current step for the in-noise explanation (replacing the last ones)."""
        self.noise = self._kept({k: v for k, v in self.live.items() if k[1] == step and k[2] in names})

    def _kept(self, entries: dict) -> dict:
        """The golden's taps in `keep_dtype`: converted only for what outlives the stream, not tap by tap."""

        def kept(role: str, v):
            if role == "gold" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.keep_dtype:
                return v.to(self.keep_dtype)
            return v

        return {k: kept(k[0], v) for k, v in entries.items()}

    def _prune(self, layer: int) -> None:
        """Entering `layer` of a multi-token step: drop what the window never holds."""
        if self._tokens == 1:
            return
        for key in list(self.live):
            role, _, name = key
            parts = name.split(".")
            if parts[0] != "layers":
                continue
            at, op = int(parts[1]), ".".join(parts[2:])
            if op in CACHE_OPS:
                continue
            if at < layer - 1 or (at == layer - 1 and role != "ref" and op != "resid_out"):
                del self.live[key]

    def _freeze(self) -> None:
        self.frozen = self._kept({**self.previous, **self.live})
        self.live, self.previous, self._pending = {}, {}, None


# What a window holds, for all three sides unless said otherwise (docs/differ.md, "After the verdict"):
# - at the divergent step: every tap of the divergent layer; the reference's taps of the layer before and every
#   side's resid_out there (the layer's input); embed; final_norm and logits when the divergence is past the
#   layers; each layer's cache;
# - the step before: each layer's cache, and when it decoded one token all its other taps too;
# - for the in-noise explanation (no divergence before it): that tap and the taps it reads.
# Everything else is None. The golden comes as float32 where the dtype under test is narrower.
@dataclass
class WindowSource:
    """The diagnosis' TapSource over a window: each side's taps by (step, name), None outside it."""

    config: Qwen3Config
    steps: list[StepInfo]
    dtype: torch.dtype
    model: ModelDir
    entries: dict

    def _get(self, role: str, step: int, name: str) -> torch.Tensor | None:
        v = self.entries.get((role, step, name))
        if isinstance(v, RowBlocks):
            return v.whole()
        if isinstance(v, CacheSlots):
            return v.full
        return v.values if isinstance(v, QueryRows) else v

    def ref(self, step: int, name: str) -> torch.Tensor | None:
        return self._get("ref", step, name)

    def cand(self, step: int, name: str) -> torch.Tensor | None:
        return self._get("cand", step, name)

    def gold(self, step: int, name: str) -> torch.Tensor | None:
        return self._get("gold", step, name)

    def weight(self, name: str) -> torch.Tensor | None:
        ckpt = self.model.checkpoint
        return ckpt.get(name) if name in ckpt else None


def _is_cache(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in CACHE_OPS
