"""Malformed GGUF files, generated from a real conversion: metadata of the wrong type, arrays nested thousands
deep, bad alignments, relabelled or moved tensors, declared counts in the billions. The scan reports each as
an error finding and the readers raise GGUFDamaged; nothing raises anything else, hangs or grows."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import gguf
import pytest
from helpers import peak_traced_bytes
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from qwen3dbg.model.gguf_io import GGUFDamaged, config_from_gguf, read_gguf, write_gguf
from qwen3dbg.model.layout import MAX_TENSORS
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.scan.diff import diff_weights
from qwen3dbg.scan.scan import scan_checkpoint
from qwen3dbg.util.errors import UserError

Q = gguf.GGMLQuantizationType
UINT32, INT32, F32, BOOL, STRING, ARRAY, UINT64, INT64 = 4, 5, 6, 7, 8, 9, 10, 11
_FMT = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    UINT32: "<I",
    INT32: "<i",
    F32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    12: "<d",
}
ARCH = "qwen3moe"


def _encode(vtype: int, value) -> bytes:
    if isinstance(value, bytes):
        return value
    if vtype == STRING:
        raw = value.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARRAY:
        sub, items = value
        return struct.pack("<IQ", sub, len(items)) + b"".join(_encode(sub, x) for x in items)
    return struct.pack(_FMT[vtype], value)


def _typed(value, vtype: int):
    """A parsed value back in its written form: arrays as (element type, items), elements typed like ours."""
    if vtype != ARRAY:
        return value
    sub = STRING if value and isinstance(value[0], str) else F32 if value and isinstance(value[0], float) else INT32
    return sub, value


def _serialize(kv: dict, tensors: list, data: bytes, align: int) -> bytes:
    """kv: key -> (type, value); tensors: (name, torch-order shape, type, offset in the data region)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, (vtype, value) in kv.items():
        out += _encode(STRING, key) + struct.pack("<I", vtype) + _encode(vtype, value)
    for name, shape, qtype, offset in tensors:
        out += (
            _encode(STRING, name)
            + struct.pack("<I", len(shape))
            + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        )
        out += struct.pack("<IQ", qtype, offset)
    return out + bytes(-len(out) % align) + data


class _Parts(tuple):
    def __repr__(self):  # a failing example names the edit, not megabytes of tensor data
        return "<tiny-moe f32 GGUF parts>"


@pytest.fixture(scope="module")
def base(models, tmp_path_factory):
    """The parts of a real f32 conversion of tiny-moe, ready to be edited and written again."""
    path = write_gguf(models("tiny-moe"), tmp_path_factory.mktemp("gguf") / "m.gguf", "f32")
    g = read_gguf(path)
    kv = {k: (g.kv_types[k], _typed(v, g.kv_types[k])) for k, v in g.kv.items()}
    tensors = [(t.name, t.shape, t.qtype, t.offset - g.data_start) for t in g.tensors]
    return _Parts((kv, tensors, path.read_bytes()[g.data_start :], g.alignment))


def _deep_array(depth: int):
    """An array of arrays `depth` deep around one INT32, already encoded (encoding it recursively would not do)."""
    return ARRAY, struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQi", INT32, 1, 1)


_VALUES = st.one_of(
    st.tuples(st.just(UINT32), st.sampled_from([0, 1, 7, 3, 31, 64, 2**31, 10**9, 2**32 - 1])),
    st.tuples(st.sampled_from([INT32, INT64]), st.integers(-(2**31), -1) | st.sampled_from([0, 3, 10**9])),
    st.tuples(st.just(UINT64), st.sampled_from([0, 3, 10**9, 2**64 - 1])),
    st.tuples(st.just(F32), st.floats(width=32, allow_nan=True)),
    st.tuples(st.just(BOOL), st.booleans()),
    st.tuples(st.just(STRING), st.text(max_size=8) | st.sampled_from(["qwen3", "3", "\ud800"])),
    st.tuples(st.just(ARRAY), st.tuples(st.just(INT32), st.lists(st.integers(-3, 3), max_size=3))),
    st.tuples(st.just("deep"), st.integers(5, 3000)),  # built when written: its repr would nest as deep
)
_KEYS = st.sampled_from(
    [
        "general.alignment",
        "general.architecture",
        f"{ARCH}.block_count",
        f"{ARCH}.attention.head_count",
        f"{ARCH}.attention.head_count_kv",
        f"{ARCH}.embedding_length",
        f"{ARCH}.expert_count",
        f"{ARCH}.expert_used_count",
        f"{ARCH}.attention.key_length",
        f"{ARCH}.rope.freq_base",
        f"{ARCH}.context_length",
        f"{ARCH}.expert_weights_norm",
        "tokenizer.ggml.tokens",
        "extra.key",
    ]
)
_EDITS = st.one_of(
    st.tuples(st.just("kv"), _KEYS, _VALUES),
    st.tuples(st.just("relabel"), st.integers(0, 10**6), st.sampled_from([Q.Q8_0, Q.F16, Q.BF16, Q.Q4_0, Q.I32, 1000])),
    st.tuples(st.just("offset"), st.integers(0, 10**6), st.sampled_from([-32, 1, 7, 32, 10**12])),
    st.tuples(
        st.just("shape"),
        st.integers(0, 10**6),
        st.lists(st.sampled_from([0, 1, 2, 64, 10**9, 2**63]), min_size=0, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.integers(1, 4000)),
    st.tuples(st.just("append"), st.integers(1, 100)),
)


def _edited(base, edit) -> bytes:
    kv, tensors, data, align = dict(base[0]), list(base[1]), base[2], base[3]
    if edit[0] == "kv":
        kv[edit[1]] = _deep_array(edit[2][1]) if edit[2][0] == "deep" else edit[2]
        declared = edit[2][1] if edit[1] == "general.alignment" else None
        align = declared if isinstance(declared, int) and 0 < declared < 4096 else align
    elif edit[0] in ("relabel", "offset", "shape"):
        i = edit[1] % len(tensors)
        name, shape, qtype, offset = tensors[i]
        if edit[0] == "relabel":
            qtype = edit[2]
        elif edit[0] == "offset":
            offset = max(0, offset + edit[2])
        else:
            shape = tuple(edit[2])
        tensors[i] = (name, shape, qtype, offset)
    raw = _serialize(kv, tensors, data, align)
    if edit[0] == "truncate":
        return raw[: -edit[1]]
    return raw + bytes(edit[1]) if edit[0] == "append" else raw


def _errors(result) -> list:
    return [f for f in result.findings if f.severity == "error"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)  # shrinking a file edit takes minutes
@given(_EDITS)
def test_any_edit_of_a_gguf_is_reported_by_the_scan_and_refused_by_the_reader(base, tmp_path, edit):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = Path(d) / "m.gguf"
        path.write_bytes(_edited(base, edit))
        result = scan_checkpoint(path)
        json.dumps(result.to_dict())
        try:
            config_from_gguf(read_gguf(path))
        except GGUFDamaged as e:
            assert str(e) and _errors(result), edit
        if edit[0] != "kv" and _edited(base, edit) != _edited(base, ("append", 0)):  # the tensors or data changed
            assert _errors(result), edit


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(_EDITS)
@example(("shape", 0, [3, 2**62]))  # 3 * 2^62 elements wrap around int64
@example(("relabel", 0, Q.I32))
def test_diff_weights_against_any_edit_of_a_gguf_ends_in_a_result_or_one_sentence(base, tmp_path, edit):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        clean, damaged = Path(d) / "a.gguf", Path(d) / "b.gguf"
        clean.write_bytes(_edited(base, ("append", 0)))
        damaged.write_bytes(_edited(base, edit))
        for a, b in ((clean, damaged), (damaged, clean)):
            try:
                json.dumps(diff_weights(a, b).to_dict())
            except UserError as e:
                assert str(e)


@pytest.mark.parametrize(
    "value",
    [(UINT32, 0), (UINT32, 7), (UINT32, 48), (INT32, -32), (INT32, 32), (STRING, "32"), (F32, 32.0), (UINT64, 32)],
)
def test_an_alignment_llama_cpp_refuses_is_damage(base, tmp_path, value):
    path = tmp_path / "m.gguf"
    path.write_bytes(_edited(base, ("kv", "general.alignment", value)))
    with pytest.raises(GGUFDamaged, match="alignment"):
        read_gguf(path)
    assert _errors(scan_checkpoint(path))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.F16, Q.BF16])
@pytest.mark.parametrize("which", ["first", "last"])
def test_f32_data_relabelled_as_another_type_is_found_in_the_data_region(base, models, tmp_path, qtype, which):
    kv, tensors, data, align = base
    i = (
        next(i for i, t in enumerate(tensors) if t[2] == Q.F32 and len(t[1]) == 2)
        if which == "first"
        else max(i for i, t in enumerate(tensors) if t[2] == Q.F32 and len(t[1]) == 2)
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(_edited(base, ("relabel", i, qtype)))
    assert [f for f in _errors(scan_checkpoint(path)) if f.check == "container"]
    with pytest.raises(UserError, match="type or shape was likely changed"):  # before llama.cpp reads a byte
        load_candidate(f"llamacpp:{path}", models("tiny-moe"), "float32")


@pytest.mark.parametrize(
    "key,value", [("block_count", (UINT32, 10**9)), ("block_count", (UINT64, 2**62)), ("expert_count", (UINT32, 10**8))]
)
def test_a_declared_count_in_the_billions_costs_what_the_file_holds(base, tmp_path, key, value):
    path = tmp_path / "m.gguf"
    path.write_bytes(_edited(base, ("kv", f"{ARCH}.{key}", value)))
    result, peak = peak_traced_bytes(scan_checkpoint, path)
    assert {"layers", "experts"} & {f.check for f in _errors(result)}
    assert peak < 64 * 1024**2


@pytest.mark.parametrize(
    "key,value,field",
    [
        ("attention.head_count", (UINT32, 0), "num_attention_heads"),
        ("attention.head_count", (BOOL, True), "num_attention_heads"),
        ("block_count", (STRING, "3"), "num_hidden_layers"),
        ("block_count", (ARRAY, (INT32, [3])), "num_hidden_layers"),
        ("embedding_length", (F32, 64.0), "hidden_size"),
        ("rope.freq_base", (STRING, "1e6"), "rope_theta"),
    ],
)
def test_metadata_of_the_wrong_type_or_value_is_damage(base, tmp_path, key, value, field):
    path = tmp_path / "m.gguf"
    path.write_bytes(_edited(base, ("kv", f"{ARCH}.{key}", value)))
    with pytest.raises(GGUFDamaged, match=field):
        config_from_gguf(read_gguf(path))
    assert [f for f in _errors(scan_checkpoint(path)) if f.check == "config"]


def test_arrays_nested_thousands_deep_are_damage(base, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(_edited(base, ("kv", "extra.key", ("deep", 5000))))
    with pytest.raises(GGUFDamaged, match="nested"):
        read_gguf(path)


def test_a_tensor_table_larger_than_any_checkpoints_is_named_not_read(base, tmp_path):
    raw = bytearray(_edited(base, ("append", 0)))
    raw[8:16] = struct.pack("<Q", MAX_TENSORS + 1)  # the tensor count
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    with pytest.raises(GGUFDamaged, match=f"{MAX_TENSORS + 1} tensors"):
        read_gguf(path)


def test_experts_stacked_by_the_hundred_thousand_are_named_not_listed(base, tmp_path):
    kv, tensors, data, align = base
    experts = MAX_TENSORS + 1  # of one f32 value each: the file holds them, no checkpoint does
    path = tmp_path / "m.gguf"
    path.write_bytes(
        _serialize(kv, [("blk.0.ffn_up_exps.weight", (experts, 1, 1), Q.F32, 0)], bytes(4 * experts), align)
    )
    result, peak = peak_traced_bytes(scan_checkpoint, path)
    assert [f.numbers["tensors"] for f in _errors(result) if f.check == "container"] == [experts]
    assert peak < 64 * 1024**2
