"""Synthetic Qwen3 checkpoints in exactly the on-disk format of released ones (`qwen3dbg make-model`).

Only the weight values are made up: deterministic from a seed (each tensor from its own generator,
so sharding never changes a value), realistic in scale, with k_norm weights that reach tens in the
early layers as in the released Qwen3. Anomalies can be planted for the checkpoint scanner and the
differ's bug catalogue.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.layout import INDEX, SINGLE, tensor_shapes
from qwen3dbg.model.safetensors_stream import StreamingWriter
from qwen3dbg.util import outdir
from qwen3dbg.util.dtypes import dtype_name, parse_dtype
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.home import home


@dataclass(frozen=True)
class Preset:
    config: Qwen3Config
    weight_std: float | None  # None: 1/sqrt(fan_in), which keeps tiny models' activations O(1)
    k_norm_peak: float
    about: str


_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # head_dim != hidden/heads on purpose
    max_position_embeddings=4096,
)
_TINY_MOE = dict(
    _TINY,
    model_type="qwen3_moe",
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    tie_word_embeddings=False,
)

PRESETS: dict[str, Preset] = {
    "tiny-dense": Preset(
        Qwen3Config(model_type="qwen3", tie_word_embeddings=True, **_TINY),
        None,
        20.0,
        "3 layers, hidden 64, 4/2 heads of 32, vocab 512; for tests",
    ),
    "tiny-wide": Preset(
        Qwen3Config(
            model_type="qwen3", tie_word_embeddings=True, **dict(_TINY, hidden_size=512, intermediate_size=1024)
        ),
        None,
        20.0,
        "tiny-dense with hidden 512 and intermediate 1024: reductions long enough for bf16 accumulation to "
        "stand out of bf16's own noise (docs/catalogue.md, lowp-accumulation)",
    ),
    "tiny-moe": Preset(
        Qwen3Config(norm_topk_prob=True, **_TINY_MOE),
        None,
        20.0,
        "tiny-dense's attention with 8 experts of 48, top-2, norm_topk_prob true",
    ),
    "tiny-moe-nonorm": Preset(
        Qwen3Config(norm_topk_prob=False, **_TINY_MOE), None, 20.0, "tiny-moe with norm_topk_prob false"
    ),
    "qwen3-0.6b": Preset(
        Qwen3Config(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        0.02,
        96.5,
        "the real Qwen3-0.6B shape (28 layers, 1.2 GB in bf16)",
    ),
    "qwen3-30b-a3b-2l": Preset(
        Qwen3Config(
            model_type="qwen3_moe",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            tie_word_embeddings=False,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
        ),
        0.02,
        96.5,
        "Qwen3-30B-A3B's real per-layer shapes (128 experts of 768, 32/4 heads) with 2 layers (3.7 GB)",
    ),
}


@dataclass(frozen=True)
class Plants:
    """Anomalies to plant; all off by default."""

    k_norm_peak: float | None = None  # override the preset's largest k_norm weight (layer 0)
    q_norm_peak: float | None = None  # put one q_norm channel per layer at this value
    ghost_bias: float | None = None  # write q/k/v/o_proj.bias (config keeps attention_bias false), values ~ N(0, x)
    nonfinite: tuple[str, ...] = field(default_factory=tuple)  # tensors that get a NaN and an inf
    huge: tuple[str, ...] = field(default_factory=tuple)  # tensors that get values of 1e30


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _norm_weight(name: str, size: int, g: torch.Generator, cfg: Qwen3Config, preset: Preset, plants: Plants):
    w = (1.0 + 0.2 * torch.randn(size, generator=g)).abs() + 0.05
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    if name.endswith("k_norm.weight"):
        # Released Qwen3: a few k_norm channels reach ~100 in early layers and fade with depth.
        peak = (plants.k_norm_peak or preset.k_norm_peak) * 0.5**layer
        if peak > 2:
            chans = torch.randperm(size, generator=g)[:2]
            w[chans[0]], w[chans[1]] = peak, peak / 2
    if name.endswith("q_norm.weight") and plants.q_norm_peak:
        w[int(torch.randint(size, (1,), generator=g))] = plants.q_norm_peak
    return w


def make_tensor(
    name: str, shape: tuple[int, ...], cfg: Qwen3Config, preset: Preset, plants: Plants, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    g = _generator(seed, name)
    if name.endswith("norm.weight"):
        t = _norm_weight(name, shape[0], g, cfg, preset, plants)
    elif name.endswith(".bias"):
        t = torch.randn(shape, generator=g) * plants.ghost_bias
    else:
        std = preset.weight_std or shape[-1] ** -0.5
        t = torch.randn(shape, generator=g, dtype=dtype).mul_(std)  # drawn in the disk dtype: 2x faster
    t = t.to(dtype)
    if name in plants.nonfinite:
        t.view(-1)[0], t.view(-1)[-1] = float("nan"), float("inf")
    if name in plants.huge:
        t.view(-1)[: max(1, t.numel() // 100)] = 1e30 if dtype != torch.float16 else 6e4
    return t


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def make_model(
    out_dir: str | Path,
    preset: str = "tiny-dense",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = 4 * 1024**3,
    plants: Plants = Plants(),
    overrides: dict | None = None,
    progress: Callable[[Iterator, int], Iterator] | None = None,
    replace: bool = False,
) -> Path:
    """Write config.json and safetensors (sharded above `shard_bytes`); return the directory. A directory
    holding anything is refused unless `replace`, which removes only what make_model wrote there before."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    torch_dtype = parse_dtype(dtype)
    cfg = p.config.replace(torch_dtype=dtype_name(torch_dtype), **(overrides or {}))
    shapes = tensor_shapes(cfg, ghost_bias=plants.ghost_bias is not None)
    for name in plants.nonfinite + plants.huge:
        if name not in shapes:
            raise UserError(f"cannot plant into {name!r}: the checkpoint has no such tensor")
    shards = _shards(shapes, torch.tensor([], dtype=torch_dtype).element_size(), shard_bytes)
    files = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out = Path(out_dir)
    old = outdir.claim(out, "make-model", ("config.json", "*.safetensors", INDEX), replace)
    out.mkdir(parents=True, exist_ok=True)
    written = ["config.json", *files, *([INDEX] if len(files) > 1 else [])]
    outdir.record(out, "make-model", old + written)
    for name in old:
        (out / name).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    names = iter(shapes)
    if progress is not None:
        names = progress(names, len(shapes))
    writers = [StreamingWriter(out / f, {n: shapes[n] for n in s}) for f, s in zip(files, shards)]
    file_of = {n: w for w, s in zip(writers, shards) for n in s}
    for name in names:
        file_of[name].write(name, make_tensor(name, shapes[name], cfg, p, plants, seed, torch_dtype))
    for w in writers:
        w.close()
    if len(files) > 1:
        total = sum(w.offset for w in writers)
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        (out / INDEX).write_text(json.dumps(index, indent=2))
    outdir.record(out, "make-model", written)
    return out


def generator_digest() -> str:
    """What make_model's output depends on: this file, the config and layout modules it writes through,
    and torch's random number generator."""
    import qwen3dbg.model.config
    import qwen3dbg.model.layout

    sources = b"".join(
        Path(f).read_bytes() for f in (__file__, qwen3dbg.model.config.__file__, qwen3dbg.model.layout.__file__)
    )
    return hashlib.sha256(sources + torch.__version__.encode()).hexdigest()[:12]


def default_model_dir(preset: str = "tiny-dense") -> Path:
    """The embedded default: a synthetic model made on first use and kept under ~/.cache/qwen3dbg, one
    per generator_digest, so that a cached model is what make-model writes today (a store captured on
    it and diffed against a fresh one must not differ by a generator change)."""
    root = home("models", f"{preset}-seed0-{generator_digest()}")
    done = root / ".complete"
    if not done.exists():
        make_model(root, preset, replace=True)  # what a run that died left
        done.touch()
        from qwen3dbg.util.home import fit

        fit(keep=root)  # older generators' defaults and older versions' runs go first
    return root
