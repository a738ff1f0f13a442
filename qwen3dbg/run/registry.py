"""Implementations by name: the one place `--impl`, `--ref` and `--cand` are resolved.

Entries are import paths, so naming an implementation imports only what it needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import TYPE_CHECKING

from qwen3dbg.util.errors import UserError

if TYPE_CHECKING:
    from qwen3dbg.run.candidate import Candidate

IMPLEMENTATIONS: dict[str, str] = {
    "hf": "qwen3dbg.reference.hf:HFCandidate",
    "scratch": "qwen3dbg.reference.qwen3:Qwen3Reference",
    "mine": "qwen3dbg.candidates.mine.engine:MineCandidate",
    "litgpt": "qwen3dbg.candidates.ports.litgpt_qwen3:LitGPTCandidate",  # pip install '.[litgpt]' (docs/ports.md)
    "vllm": "qwen3dbg.candidates.vllm:VllmCandidate",  # in the venv of .ci/install_vllm.sh (docs/engines.md)
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


def with_attn(spec, attn: str | None):
    """`--impl hf --attn sdpa` is `--impl hf:attn=sdpa`: an option of hf, given once, as the spec's option."""
    if attn is None:
        return spec
    if spec.name != "hf" or "attn" in spec.options or not attn:
        raise UserError(f"--attn {attn!r}: an option of hf (eager or sdpa), given once; not with --impl {spec.text}")
    return dataclasses.replace(spec, options={**spec.options, "attn": attn})


def names() -> list[str]:
    return sorted(IMPLEMENTATIONS)


def load_candidate(name: str, model_dir, dtype, /, **options) -> Candidate:
    """Implementation `name` for a model directory (a path or an opened ModelDir) in a dtype, checked then loaded."""
    check_candidate(name, model_dir, dtype, **options)
    return construct(name, model_dir, dtype, **options)


def construct(name: str, model_dir, dtype, /, **options) -> Candidate:
    """Implementation `name` loaded without its check: for a side `check_candidate` has already passed."""
    cls, args = _resolve(name, model_dir, dtype, options)
    return cls(*args, **options)


def check_candidate(name: str, model_dir, dtype, /, **options) -> None:
    """Everything `load_candidate` would refuse, said before any model runs and without loading weights:
    the name resolves, its module and optional dependency import, the options are ones it takes, and its
    own `check` (a port's file, factory and mapping; a GGUF file and llama-cpp-python) passes."""
    cls, args = _resolve(name, model_dir, dtype, options)
    check = getattr(cls, "check", None)
    if check is not None:
        check(*args, **options)


def check_name(name: str) -> None:
    """Refuse a name that is neither registered nor prefixed, from the text alone (nothing is imported)."""
    prefix, _, rest = name.partition(":")
    if (rest and prefix in PREFIXES) or name in IMPLEMENTATIONS:
        return
    close = difflib.get_close_matches(name, [*names(), *(f"{p}:" for p in PREFIXES)], n=1)
    hint = f"did you mean {close[0]}? Otherwise " if close else ""
    raise UserError(
        f"unknown implementation {name!r}: {hint}choose one of {', '.join(names())}, "
        "or module:FILE.py:factory, llamacpp:MODEL.gguf"
    )


def _resolve(name: str, model_dir, dtype, options: dict) -> tuple[type, tuple]:
    """The class `name` names and its positional arguments; options it does not take are refused."""
    check_name(name)
    prefix, _, rest = name.partition(":")
    if rest and prefix in PREFIXES:
        target, args = PREFIXES[prefix], (rest, model_dir, dtype)
    else:
        target, args = IMPLEMENTATIONS[name], (model_dir, dtype)
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    params = inspect.signature(cls).parameters.values()
    positional = [p.name for p in params][: len(args)]
    given = next((k for k in options if k in positional), None)
    if given is not None:  # what the run passes every side (--dtype, --model) is not an option of one
        flag = {"dtype": "--dtype", "model_dir": "--model"}.get(given, "the side's own text")
        raise UserError(
            f"{name} option {given}={options[given]}: the run sets {given} for every side; give it with {flag}"
        )
    declared = getattr(cls, "options", None)  # a dataclass of its options, where it keeps them in one
    if declared is not None:
        accepted, open_ended = [f.name for f in dataclasses.fields(declared)], False
    else:
        accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [k for k in options if k not in accepted]
    if unknown and not open_ended:
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
        raise UserError(f"implementation {name!r} has no option {unknown[0]!r}: {takes}")
    return cls, args
