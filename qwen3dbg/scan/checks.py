"""The scan's rules: tensors against the config, values of each tensor, and norm weights that amplify rounding.

Each rule is a free function returning findings; the thresholds are one frozen dataclass.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.scan.container import INTEGER_DTYPES, Entry
from qwen3dbg.scan.findings import CheckpointFinding, NormPeak
from qwen3dbg.scan.stats import Stats


@dataclass(frozen=True)
class Thresholds:
    norm: float = 20.0  # a norm weight above this is flagged: it multiplies rounding errors by as much
    huge: float = 1e4  # no trained Qwen3 weight comes near this; corrupted buffers hold 1e29..1e34
    #: a q_norm/k_norm weight w scales the normalized query/key (RMS 1), so one bf16 rounding of them (relative
    #: u = 2^-8, the coarsest dtype engines run Qwen3 in) moves an attention logit q.k/sqrt(D) by about w*u
    #: when the other side is of unit scale; at w >= 1/u = 256 that is >= 1, a factor e on attention weights:
    #: bf16 inference of that layer is noise. Released Qwen3 k_norm weights reach about 100 (the 0.6B preset's
    #: 96.5) and stay warnings.
    attention_norm: float = 2.0**8

    def to_dict(self) -> dict:
        return asdict(self)


_NORMS = {
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GHOST = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias")


def norm_role(hf: str) -> tuple[int | None, str] | None:
    """(layer, kind) of a norm weight by its HF name; layer None for the final norm; None if not a norm."""
    if hf == "model.norm.weight":
        return None, "norm"
    m = _LAYER.fullmatch(hf)
    return (int(m[1]), _NORMS[m[2]]) if m and m[2] in _NORMS else None


def is_ghost_bias(hf: str, cfg: Qwen3Config) -> bool:
    return not cfg.attention_bias and bool(_GHOST.fullmatch(hf))


def against_config(
    cfg: Qwen3Config,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    hf_of: dict[str, list[str]],
) -> list[CheckpointFinding]:
    """Missing, unexpected and misshapen tensors. `shapes`/`expected` use the file's own names; `hf_of`
    maps them to the HF names they hold (GGUF stacks experts). Ghost biases are left to `values`, where
    they get their statistics; layer and expert counts to `layout.count_problems`."""
    out = []
    for name, shape in expected.items():
        if name not in shapes:
            out.append(
                CheckpointFinding(
                    "error",
                    "missing",
                    f"{name} {list(shape)} is missing",
                    "the config needs it: loading fails or the weight is left uninitialized",
                    name,
                )
            )
        elif tuple(shapes[name]) != tuple(shape):
            out.append(
                CheckpointFinding(
                    "error",
                    "shape",
                    f"{name} has shape {list(shapes[name])}, the config implies {list(shape)}",
                    "a loader either fails or reads the values in the wrong layout",
                    name,
                    {"shape": list(shapes[name]), "expected": list(shape)},
                )
            )
    for name in shapes:
        hf = (hf_of.get(name) or [""])[0]
        if name in expected or is_ghost_bias(hf, cfg):
            continue
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # judged by `tied_head`
        out.append(
            CheckpointFinding(
                "error",
                "unexpected",
                f"{name} is not part of a {cfg.model_type} checkpoint of this config",
                "the config has no place for it: a strict loader fails, an engine that loads every tensor may "
                "compute with it",
                name,
            )
        )
    return out


def tied_head(same_as_embedding: bool) -> CheckpointFinding:
    """`lm_head.weight` stored although tie_word_embeddings is true."""
    if same_as_embedding:
        return CheckpointFinding(
            "info",
            "tied",
            "lm_head.weight is stored although tie_word_embeddings is true; it equals model.embed_tokens.weight",
            "harmless: loaders tie it to the embedding",
            "lm_head.weight",
        )
    return CheckpointFinding(
        "warning",
        "tied",
        "lm_head.weight differs from model.embed_tokens.weight although tie_word_embeddings is true",
        "transformers ignores it and uses the embedding; an implementation that loads it computes other logits",
        "lm_head.weight",
    )


def dtypes(entries: list[Entry], cfg: Qwen3Config | None, gguf: bool) -> list[CheckpointFinding]:
    counts = Counter(e.dtype for e in entries)
    listing = ", ".join(f"{n} {d}" for d, n in counts.most_common())
    out = []
    if ints := [e for e in entries if e.dtype in INTEGER_DTYPES]:
        out.append(
            CheckpointFinding(
                "error",
                "dtype",
                f"{len(ints)} tensor(s) hold integers, {ints[0].name} ({ints[0].dtype}) first",
                "weights must be floating point: a loader converts the integers and runs a model no one trained",
                ints[0].name,
                {"integer_tensors": len(ints)},
            )
        )
    if gguf:
        out.append(
            CheckpointFinding(
                "info",
                "dtype",
                f"tensor types: {listing}",
                "norms and the router stay F32 in llama.cpp's converter, so a mixture is normal in GGUF",
                numbers=dict(counts),
            )
        )
    elif len(counts) > 1:
        out.append(
            CheckpointFinding(
                "warning",
                "dtype",
                f"mixed dtypes: {listing}",
                "an implementation that assumes one dtype reads some tensors wrong",
                numbers=dict(counts),
            )
        )
    elif cfg is not None and counts and next(iter(counts)) != cfg.torch_dtype:
        out.append(
            CheckpointFinding(
                "info",
                "dtype",
                f"all tensors are {next(iter(counts))}, config.json says {cfg.torch_dtype}",
                "loaders that trust the config convert on load",
                numbers=dict(counts),
            )
        )
    return out


def values(name: str, hf: str, s: Stats, cfg: Qwen3Config | None, th: Thresholds) -> list[CheckpointFinding]:
    """Findings about one tensor's values."""
    out = []
    nums = {k: v for k, v in s.to_dict().items() if k != "numel"}
    if cfg is not None and is_ghost_bias(hf, cfg):
        out.append(
            CheckpointFinding(
                "error",
                "ghost-bias",
                f"{name} exists although attention_bias is false "
                f"(absmax {s.absmax:.4g}, mean {s.mean:.4g}, std {s.std:.4g})",
                "the config says it does not exist: transformers ignores it, an engine that loads every tensor adds "
                "it and computes a model no one trained",
                name,
                nums,
            )
        )
    if s.nonfinite:
        out.append(
            CheckpointFinding(
                "error",
                "nonfinite",
                f"{name} holds {s.n_nan} NaN, {s.n_posinf} +inf, {s.n_neginf} -inf",
                "one non-finite weight turns every activation it touches into NaN",
                name,
                nums,
            )
        )
    if s.absmax >= th.huge:
        out.append(
            CheckpointFinding(
                "error",
                "huge",
                f"{name} has |values| up to {s.absmax:.4g} (threshold {th.huge:g})",
                "no trained weight is this large; corrupted or uninitialized buffers are",
                name,
                nums,
            )
        )
    if s.numel and s.n_zero == s.numel:
        out.append(
            CheckpointFinding(
                "error",
                "zero",
                f"{name} is all zeros",
                "a trained weight never is: the bytes were probably never written",
                name,
                nums,
            )
        )
    elif s.numel > 1 and not s.nonfinite and s.min == s.max:
        out.append(
            CheckpointFinding(
                "warning",
                "constant",
                f"{name} is constant ({s.min:g})",
                "a trained weight rarely is: it looks like an initializer's value",
                name,
                nums,
            )
        )
    return out


def norm_danger(peaks: list[NormPeak], th: Thresholds) -> list[CheckpointFinding]:
    """A warning above `th.norm`; an error for a q_norm/k_norm weight at or above `th.attention_norm`."""
    out = []
    for p in peaks:
        if p.absmax <= th.norm:
            continue
        fatal = p.kind in ("q_norm", "k_norm") and p.absmax >= th.attention_norm
        out.append(
            CheckpointFinding(
                "error" if fatal else "warning",
                "norm-danger",
                f"{p.kind} weight {p.absmax:.4g} in {'the final norm' if p.layer is None else f'layer {p.layer}'}: "
                f"a rounding error entering this norm leaves it about {p.absmax:.0f}x larger",
                f"at or above {th.attention_norm:g}: one bf16 rounding of the normalized "
                f"{'keys' if p.kind == 'k_norm' else 'queries'} moves attention logits by 1 or more, so bf16 "
                "inference of this layer is noise (released Qwen3 k_norm weights stay near 100)"
                if fatal
                else f"above {th.norm:g}: bf16/fp16 differences between implementations are amplified here, so "
                "compare this layer with a looser tolerance or in fp32",
                p.tensor,
                {"absmax": p.absmax, "layer": p.layer, "threshold": th.attention_norm if fatal else th.norm},
            )
        )
    return out
