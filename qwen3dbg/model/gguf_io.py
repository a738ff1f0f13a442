"""GGUF files of Qwen3 checkpoints: write one from a safetensors model directory, read one back.

The writer follows llama.cpp's converter: the `qwen3` / `qwen3moe` metadata its loader reads, experts
stacked per layer, norms and the router kept in F32, q/k NOT permuted (Qwen3 uses NEOX rope in
llama.cpp), and a minimal byte-level BPE vocabulary so llama.cpp can load the file (ids only mean
anything to our synthetic models). The reader parses the container itself, so a damaged file raises
`GGUFDamaged` with what is wrong instead of an arbitrary exception.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import Qwen3Config, load_config, parse_config
from qwen3dbg.model.gguf_names import ARCH, MODEL_TYPE, gguf_shapes, hf_to_gguf
from qwen3dbg.model.layout import MAX_TENSORS
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.jsonio import open_regular

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPE = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_F32_ALWAYS = ("_norm.weight", "ffn_gate_inp.weight")  # as llama.cpp's converter: norms and the router


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table: byte b is token text alphabet[b] in byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tokenizer(writer: gguf.GGUFWriter, cfg: Qwen3Config) -> None:
    if cfg.vocab_size <= 256:
        raise UserError(f"vocab_size {cfg.vocab_size} is too small for a byte-level GGUF vocabulary (needs > 256)")
    space = byte_level_alphabet()[ord(" ")]
    tokens = byte_level_alphabet() + [space * 2] + [f"<|qwen3dbg_{i}|>" for i in range(257, cfg.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges([f"{space} {space}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)


def _metadata(writer: gguf.GGUFWriter, cfg: Qwen3Config, qtype: Q, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)  # Qwen3's head_dim is not hidden/heads: without these llama.cpp guesses wrong
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.is_moe:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_file_type(_FILE_TYPE[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, cfg)


def storage_type(gguf_name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """The GGUF type a tensor is stored in when `wanted` is asked for (llama.cpp's converter rules)."""
    if len(shape) <= 1 or gguf_name.endswith(_F32_ALWAYS):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size  # exact: dims [3, 2^62] must not wrap around int64 to a small size


def encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes of `t` in a GGUF type, as the array the writer stores."""
    if qtype == Q.F32:
        return t.float().numpy()
    if qtype == Q.F16:
        return t.half().numpy()
    if qtype == Q.BF16:
        return t.bfloat16().view(torch.int16).numpy()
    return gguf.quants.quantize(t.float().numpy(), qtype)


def gguf_plan(ckpt: Checkpoint) -> dict[str, list[str]]:
    """GGUF tensor name -> the HF tensors it is made of (several for stacked experts), in file order."""
    plan: dict[str, list[str]] = {}
    for hf in ckpt.keys():
        mapped = hf_to_gguf(hf)
        if mapped is None:
            raise UserError(f"tensor {hf!r} has no GGUF name: it is not part of a Qwen3 checkpoint")
        plan.setdefault(mapped[0], []).append(hf)
    for g, members in plan.items():
        if len(members) > 1:
            members.sort(key=lambda n: hf_to_gguf(n)[1])
    return plan


def make_gguf_model(
    out: str | Path,
    preset: str,
    gguf_type: str = "f16",
    *,
    converting: Callable[[], None] | None = None,
    **make_model_options,
) -> Path:
    """A synthetic model (`synth.make_model` and its options) as one GGUF file: written as safetensors to
    a temporary folder beside `out`, then converted; `converting()` is called between the two phases."""
    import tempfile

    from qwen3dbg.model.synth import make_model

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        make_model(tmp, preset, **make_model_options)
        if converting is not None:
            converting()
        return write_gguf(
            tmp,
            out,
            gguf_type,
            progress=make_model_options.get("progress"),
            name=f"{preset}-seed{make_model_options.get('seed', 0)}",
        )


def write_gguf(
    model_dir: str | Path,
    out: str | Path,
    gguf_type: str = "f16",
    progress: Callable[[Iterator, int], Iterator] | None = None,
    name: str | None = None,
) -> Path:
    """Convert a Qwen3 safetensors model directory to one GGUF file of `gguf_type`; return its path.

    `name` becomes general.name (default: the directory's name)."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    wanted = GGUF_TYPES[gguf_type]
    cfg, ckpt = load_config(model_dir), Checkpoint(model_dir)
    plan = gguf_plan(ckpt)
    shapes = gguf_shapes({n: ckpt.shape(n) for n in ckpt.keys()})
    stacked = {g for g, m in plan.items() if hf_to_gguf(m[0])[1] is not None}  # experts [E, ...]
    for g in stacked:  # plan lists members by expert id: they must be exactly 0..E-1
        ids = [hf_to_gguf(m)[1] for m in plan[g]]
        if len(ids) != cfg.num_experts or ids != list(range(len(ids))):  # never a list of the config's count
            raise UserError(
                f"{g}: the checkpoint has {len(plan[g])} experts' tensors, not the config's experts "
                f"0..{cfg.num_experts - 1}; run scan-checkpoint to see which are missing"
            )
    types = {g: storage_type(g, shapes[g], wanted) for g in plan}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, ARCH[cfg.model_type])
    _metadata(writer, cfg, wanted, name or Path(model_dir).resolve().name)
    for g in plan:
        writer.add_tensor_info(g, shapes[g], np.dtype(np.float32), nbytes(shapes[g], types[g]), raw_dtype=types[g])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    names = iter(plan)
    if progress is not None:
        names = progress(names, len(plan))
    for g in names:
        members = plan[g]
        t = torch.stack([ckpt.get(m) for m in members]) if g in stacked else ckpt.get(members[0])
        writer.write_tensor_data(encode(t, types[g]))
    writer.close()
    return out


# --- reading ---------------------------------------------------------------------------------


class GGUFDamaged(ValueError):
    """The file is not a well-formed GGUF container; the message says where it breaks."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores dimensions innermost first)
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int | None  # None: a type this reader does not know

    @property
    def type_name(self) -> str:
        return Q(self.qtype).name if self.qtype in Q._value2member_map_ else f"type{self.qtype}"


@dataclass
class GGUFFile:
    path: Path
    version: int
    kv: dict
    kv_types: dict  # key -> GGUF value type id (4: UINT32, 8: STRING, 9: ARRAY, ...)
    tensors: list[GGUFTensor]
    data_start: int
    alignment: int
    file_size: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_UINT32, _F32, _STRING, _ARRAY = 4, 6, 8, 9
#: llama.cpp reads no arrays of arrays at all; a bound keeps a crafted file from nesting thousands deep
MAX_ARRAY_DEPTH = 4
#: elements of one metadata array: 16x the largest vocabulary in use, and a bound on the memory it takes
MAX_ARRAY_LEN = 1 << 22


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFDamaged(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFDamaged(f"{what} at byte {self.pos - len(raw)} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == _F32:  # the shortest decimal that is this float32: 1e-06, not 9.99999997e-07
            return float(str(np.float32(self.unpack("<f", what))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFDamaged(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
            sub, n = self.unpack("<I", what), self.unpack("<Q", what)
            if n > min(MAX_ARRAY_LEN, self.size - self.pos):  # every element takes at least one byte
                raise GGUFDamaged(
                    f"{what}: array length {n} is larger than the rest of the file or than {MAX_ARRAY_LEN}"
                )
            if sub in _SCALARS:  # in one read, not one Python call per element
                fmt = np.dtype(_SCALARS[sub])
                values = np.frombuffer(self.take(n * fmt.itemsize, what), fmt)
                return [float(str(v)) for v in values] if sub == _F32 else values.tolist()
            return [self.value(sub, what, depth + 1) for _ in range(n)]
        raise GGUFDamaged(f"{what}: unknown value type {vtype}")


def _alignment(kv: dict, kv_types: dict) -> int:
    """general.alignment as llama.cpp reads it: a UINT32 power of two, 32 when absent."""
    if "general.alignment" not in kv:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    align = kv["general.alignment"]
    if kv_types["general.alignment"] != _UINT32 or align <= 0 or align & (align - 1):
        raise GGUFDamaged(f"general.alignment is {align!r}, not a power of two stored as UINT32 (llama.cpp refuses it)")
    return align


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (no tensor data is read)."""
    path = Path(path)
    try:
        f = open_regular(path)
    except OSError as e:
        raise GGUFDamaged(f"it cannot be read: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFDamaged(f"the file has {size} bytes, fewer than a GGUF header's 24")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            c = _Cursor(mm, size)
            if c.take(4, "magic") != b"GGUF":
                raise GGUFDamaged("the file does not start with the GGUF magic")
            version = c.unpack("<I", "version")
            if version not in (2, 3):
                raise GGUFDamaged(f"GGUF version {version} is not 2 or 3")
            n_tensors, n_kv = c.unpack("<Q", "tensor count"), c.unpack("<Q", "metadata count")
            if n_tensors > min(size, MAX_TENSORS) or n_kv > size:
                raise GGUFDamaged(
                    f"the header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file "
                    f"can hold or than the {MAX_TENSORS} tensors of any checkpoint"
                )
            kv, kv_types = {}, {}
            for i in range(n_kv):
                key = c.string(f"metadata key {i}")
                if key in kv:
                    raise GGUFDamaged(f"metadata key {key} appears twice (llama.cpp refuses the file)")
                kv_types[key] = c.unpack("<I", f"type of {key}")
                kv[key] = c.value(kv_types[key], key)
            infos, names = [], set()
            for i in range(n_tensors):
                name = c.string(f"tensor name {i}")
                if name in names:
                    raise GGUFDamaged(f"tensor {name} appears twice in the tensor table (llama.cpp refuses the file)")
                names.add(name)
                n_dims = c.unpack("<I", f"dimensions of {name}")
                if n_dims > 8:
                    raise GGUFDamaged(f"tensor {name} claims {n_dims} dimensions")
                dims = [c.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
                infos.append(
                    (
                        name,
                        tuple(reversed(dims)),
                        c.unpack("<I", f"type of {name}"),
                        c.unpack("<Q", f"offset of {name}"),
                    )
                )
            align = _alignment(kv, kv_types)
            data_start = c.pos + (-c.pos % align)
    tensors = []
    for name, shape, qtype, offset in infos:
        known = qtype in Q._value2member_map_ and Q(qtype) in gguf.GGML_QUANT_SIZES
        tensors.append(GGUFTensor(name, shape, qtype, data_start + offset, nbytes(shape, Q(qtype)) if known else None))
    return GGUFFile(path, version, kv, kv_types, tensors, data_start, align, size)


def data_region_problems(g: GGUFFile) -> list[tuple[str | None, str, dict]]:
    """(tensor or None, sentence, numbers) wherever the data region departs from the layout llama.cpp loads:
    each tensor starts, aligned, where the one before it ends, and the last one ends the file. A tensor
    whose type or shape was changed after writing (f32 bytes labelled q8_0) shows here as bytes out of place."""
    out, expected = [], g.data_start  # where the next tensor must start; None once a tensor's size is unknown
    for t in g.tensors:
        if expected is None:
            break
        if t.offset != expected:
            out.append(
                (
                    t.name,
                    f"its data starts at byte {t.offset}, but the tensors before it end at byte {expected} "
                    f"(aligned to {g.alignment}): llama.cpp refuses the file; a tensor's type or shape was likely "
                    "changed after writing",
                    {"offset": t.offset, "expected": expected},
                )
            )
        expected = None if t.nbytes is None else t.offset + t.nbytes + (-t.nbytes % g.alignment)
    if expected is not None and g.file_size > expected:
        out.append(
            (
                None,
                f"{g.file_size - expected} bytes after the last tensor's data belong to no tensor: a "
                "tensor's type or shape was likely changed after writing, so its bytes are read as another type",
                {"unindexed_bytes": g.file_size - expected},
            )
        )
    return out


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw bytes (uint8) as float32 of `shape`: F32 is a view of `raw` (no copy on the scan's
    hot path), every other type a new array (quantized types expanded)."""
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == Q.F64:
        return raw.view(np.float64).astype(np.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return gguf.quants.dequantize(
        raw.reshape(-1, raw.size // int(np.prod(shape[:-1], dtype=np.int64))), Q(qtype)
    ).reshape(shape)


def config_from_gguf(g: GGUFFile) -> Qwen3Config:
    """The Qwen3Config a GGUF file's metadata describes; GGUFDamaged if a needed key is absent or a value
    is of the wrong type (values go to the one config parser as they are, never through int())."""
    arch = g.kv.get("general.architecture")
    if not isinstance(arch, str) or arch not in MODEL_TYPE:
        raise GGUFDamaged(f"general.architecture is {arch!r}, not qwen3 or qwen3moe")

    def key(k, default=None):
        v = g.kv.get(f"{arch}.{k}", default)
        if v is None:
            raise GGUFDamaged(f"metadata key {arch}.{k} is missing")
        return v

    names = {t.name: t for t in g.tensors}
    tokens = g.kv.get("tokenizer.ggml.tokens")
    vocab = (
        len(tokens)
        if isinstance(tokens, list)
        else names["token_embd.weight"].shape[0]
        if "token_embd.weight" in names
        else key("vocab_size")
    )
    raw = {  # config.json's names, so the one parser checks a GGUF's config like any other
        "model_type": MODEL_TYPE[arch],
        "vocab_size": vocab,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": g.kv.get(f"{arch}.attention.head_count_kv"),
        "head_dim": g.kv.get(f"{arch}.attention.key_length"),
        "rope_theta": key("rope.freq_base", 1e6),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": "output.weight" not in names,
        "max_position_embeddings": key("context_length", 40960),
        "num_experts": key("expert_count", 0),
        "num_experts_per_tok": key("expert_used_count", 0),
        "moe_intermediate_size": key("expert_feed_forward_length", 0),
        "norm_topk_prob": key("expert_weights_norm", arch == "qwen3moe"),
    }
    try:
        return parse_config(raw)
    except UserError as e:
        raise GGUFDamaged(f"its metadata describes no valid Qwen3 model: {e}") from None
