"""The one interface every implementation offers the tool (HF, scratch, our engine, catalogue bugs, adapters)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.tapstore.schema import tap_name
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.errors import UserError


def option_flag(impl: str, name: str, value: bool | str) -> bool:
    """An on/off option of an implementation, as a bool or as `NAME:key=value` passes it (a string, where
    "false" would be truthy): true/false, 1/0, yes/no, on/off."""
    text = str(value).lower()
    if text not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        raise UserError(f"{impl} option {name}={value!r}: choose true or false")
    return text in ("true", "1", "yes", "on")


class NullSink:
    """A sink that wants nothing: a plain forward with capture off."""

    def wants(self, name: str) -> bool:
        return False

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        pass


class DictSink:
    """Keeps taps in memory (tests, teacher forcing of one layer)."""

    def __init__(self, only: set[str] | None = None):
        self.only, self.taps = only, {}

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self.wants(name):
            self.taps[name] = tensor.detach().clone()


# A candidate is loaded once for a model directory and a dtype, then runs forward steps: `reset()` forgets the KV
# cache, `step(ids, positions, sink)` runs one step (prefill or decode) and hands every tap it produces to the
# sink. Candidates that can run one decoder layer alone from a given input also implement `run_layer`, which the
# differ uses for teacher forcing.
class Candidate(ABC):
    name: str = "?"
    config: Qwen3Config
    dtype: torch.dtype
    #: ops of the schema this implementation cannot expose (external engines only)
    missing_taps: frozenset[str] = frozenset()
    #: True when a tensor handed to the sink is never changed afterwards (no buffer reused, no in-place
    #: update), so a diff may keep it without a copy; engines with preallocated buffers leave it False
    fresh_taps: bool = False
    #: False for an engine that reads its own weights file (a GGUF), not the model directory's safetensors:
    #: a capture then records no digest of those
    reads_model_weights: bool = True

    def logits_positions(self, info) -> list[int] | None:
        """The positions of the step `info` whose logits this implementation computes; None: all of them (a
        serving engine computes them at the rows it samples only)."""
        return None

    def manifest_extra(self) -> dict:
        """Fields this implementation adds to a store's manifest (e.g. which attention path ran)."""
        return {}

    @abstractmethod
    def reset(self) -> None:
        """Forget the KV cache: the next step is a prefill."""

    @abstractmethod
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink) -> torch.Tensor:
        """Run one step on ids [B,T] at positions [B,T], hand taps to `sink`, return logits [B,T,V]."""

    supports_layer = False

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None,
        sink: TapSink,
    ) -> torch.Tensor:
        """Run decoder layer `layer` alone on hidden [B,T,H] with the given cache [B,nKV,S',D]; return resid_out."""
        raise NotImplementedError(f"{self.name} cannot run a single layer")


def emit(sink: TapSink, layer: int | None, op: str, t: torch.Tensor) -> None:
    """Hand a tap to the sink if it wants it (so unselected taps cost nothing)."""
    name = tap_name(op, layer)
    if sink.wants(name):
        sink(name, t)
