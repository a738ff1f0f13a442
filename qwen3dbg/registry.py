"""Implementations by name: the one place `--impl`, `--ref` and `--cand` are resolved.

Entries are import paths, so naming an implementation imports only what it needs.
"""

from __future__ import annotations

import importlib
import inspect

from qwen3dbg.candidate import Candidate
from qwen3dbg.errors import UserError

IMPLEMENTATIONS: dict[str, str] = {
    "hf": "qwen3dbg.reference.hf:HFCandidate",
    "scratch": "qwen3dbg.reference.qwen3:Qwen3Reference",
    "mine": "qwen3dbg.candidates.mine.engine:MineCandidate",
    "litgpt": "qwen3dbg.candidates.ports.litgpt_qwen3:LitGPTCandidate",  # pip install '.[litgpt]' (docs/ports.md)
    # the bug catalogue: one bug each (rmsnorm-fused is the clean one); see candidates/catalogue.py
    "rope-interleaved": "qwen3dbg.candidates.catalogue:RopeInterleaved",
    "rope-theta-1e4": "qwen3dbg.candidates.catalogue:RopeTheta1e4",
    "qk-norm-over-hidden": "qwen3dbg.candidates.catalogue:QkNormOverHidden",
    "softmax-wrong-axis": "qwen3dbg.candidates.catalogue:SoftmaxWrongAxis",
    "no-transpose": "qwen3dbg.candidates.catalogue:NoTransposeBeforeReshape",
    "ghost-bias": "qwen3dbg.candidates.catalogue:GhostBias",
    "no-causal-mask": "qwen3dbg.candidates.catalogue:CausalMaskMissing",
    "embed-scaled": "qwen3dbg.candidates.catalogue:EmbedScaled",
    "kv-cache-off-by-one": "qwen3dbg.candidates.catalogue:KvCacheOffByOne",
    "gqa-modulo": "qwen3dbg.candidates.catalogue:GqaModulo",
    "softmax-no-max": "qwen3dbg.candidates.catalogue:SoftmaxNoMax",
    "missing-scale": "qwen3dbg.candidates.catalogue:MissingScale",
    "lowp-accumulation": "qwen3dbg.candidates.catalogue:LowPrecisionAccumulation",
    "moe-topk-softmax": "qwen3dbg.candidates.catalogue:MoeTopkSoftmax",
    "rmsnorm-fused": "qwen3dbg.candidates.catalogue:RmsNormFused",
    # long-context bugs: exact at short lengths (docs/catalogue.md says from which length they show)
    "rope-positions-lowp": "qwen3dbg.candidates.catalogue:RopePositionsInDtype",
    "sliding-window-ignored": "qwen3dbg.candidates.catalogue:SlidingWindowIgnoresFlag",
    "kv-ring-wrap": "qwen3dbg.candidates.catalogue:RingCacheWraps",
    "paged-cache-clamped": "qwen3dbg.candidates.catalogue:PagedCacheTableClamped",
    "split-kv-unscaled": "qwen3dbg.candidates.catalogue:SplitKvUnscaledSums",
    "softmax-sum-overflow": "qwen3dbg.candidates.catalogue:SoftmaxSumInDtype",
}


# `prefix:rest` names: the class is called as cls(rest, model_dir, dtype, **options).
PREFIXES: dict[str, str] = {
    "module": "qwen3dbg.candidates.module_adapter:ModuleCandidate",
    "llamacpp": "qwen3dbg.candidates.llamacpp:LlamaCppCandidate",
}


def names() -> list[str]:
    return sorted(IMPLEMENTATIONS)


def load_candidate(name: str, model_dir, dtype, **options) -> Candidate:
    """Instantiate implementation `name` for a model directory in a dtype."""
    prefix, _, rest = name.partition(":")
    if rest and prefix in PREFIXES:
        return _construct(name, PREFIXES[prefix], (rest, model_dir, dtype), options)
    if name not in IMPLEMENTATIONS:
        raise UserError(f"unknown implementation {name!r}: choose one of {', '.join(names())}, "
                        "or module:FILE.py:factory, llamacpp:MODEL.gguf")
    return _construct(name, IMPLEMENTATIONS[name], (model_dir, dtype), options)


def _construct(name: str, target: str, args: tuple, options: dict) -> Candidate:
    """Import and build `target`; options are user-typed (`NAME:key=value`), so one the constructor
    does not take is the user's mistake, said before the constructor runs."""
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    params = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = [k for k in options if k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
        raise UserError(f"implementation {name!r} has no option {unknown[0]!r}: {takes}")
    return cls(*args, **options)
