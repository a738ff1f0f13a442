"""Malformed checkpoints, indexes and configs, generated: each variant ends in findings (scan-checkpoint)
or one UserError (the loading path: open_model / Checkpoint / load_config), never in a traceback, a
hang, a memory bomb or silent acceptance."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import deadline, peak_traced_bytes, rewrite_checkpoint
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from qwen3dbg.model.layout import INDEX, SINGLE
from qwen3dbg.model.model_dir import open_model
from qwen3dbg.scan import container
from qwen3dbg.scan.diff import diff_weights
from qwen3dbg.scan.scan import scan_checkpoint
from qwen3dbg.util.errors import UserError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
NESTED = st.integers(100, 5000).map(lambda n: "[" * n + "]" * n)


def _linked_copy(src: Path, dst: Path) -> Path:
    """A model directory whose weights are symlinks to `src`'s (cheap per example) and whose JSON is copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def _loads_or_refuses(model_dir: Path):
    """The loading path's promise: the model resolves, or one UserError says why."""
    try:
        return open_model(model_dir)
    except UserError as e:
        assert str(e)
        return None


def _errors(result, check: str | None = None) -> list:
    return [f for f in result.findings if f.severity == "error" and check in (None, f.check)]


# --- safetensors headers ----------------------------------------------------------------------------

_BASE = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}

_HEADER_EDITS = st.one_of(
    st.tuples(
        st.just("field"),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
        JSON | st.sampled_from(["F64", "I32", "BOOL", "F8_E4M3", [2, 3], [0, 32], [24, 56], [-1], [2**64]]),
    ),
    st.tuples(st.just("entry"), st.sampled_from(["a", "b", "c", "__metadata__", "\\ud800"]), JSON),
    st.tuples(st.just("nest"), NESTED),
    st.tuples(st.just("length"), st.integers(-16, 16) | st.sampled_from([2**63, 2**64 - 1, 100 * 1024**2 + 1])),
    st.tuples(st.just("bytes"), st.integers(0, 120), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 150)),
    st.tuples(st.just("data"), st.integers(-8, 8)),
)


def _mutated_safetensors(edit) -> bytes:
    header, data, delta = dict(_BASE), bytes(range(32)), 0
    blob = None
    if edit[0] == "field":
        header[edit[1]] = {**header[edit[1]], edit[2]: edit[3]}
    elif edit[0] == "entry":
        header[edit[1]] = edit[2]
    elif edit[0] == "nest":
        blob = edit[1].encode()
    elif edit[0] == "length":
        delta = edit[1]
    elif edit[0] == "data":
        data = data[: 32 + edit[1]] if edit[1] < 0 else data + bytes(edit[1])
    if blob is None:
        blob = json.dumps(header).replace('"\\\\ud800"', '"\\ud800"').encode()
    if edit[0] == "bytes":
        at = edit[1] % (len(blob) + 1)
        blob = blob[:at] + edit[2] + blob[at:]
    n = len(blob) + delta if edit[0] != "length" or abs(edit[1]) <= 16 else edit[1]
    raw = struct.pack("<Q", max(0, n) % 2**64) + blob + data
    return raw[: edit[1]] if edit[0] == "truncate" else raw


def _library_refuses(path: Path) -> bool:
    try:
        safe_open(str(path), framework="numpy")
    except SafetensorError:
        return True
    return False


@FAST
@given(_HEADER_EDITS)
def test_a_header_the_safetensors_library_refuses_is_an_error_never_a_traceback(tmp_path, edit):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(_mutated_safetensors(edit))
        result = scan_checkpoint(path)
        if _library_refuses(path):
            assert _errors(result, "container"), edit
        json.dumps(result.to_dict())  # every string in the result is writable


@FAST
@given(_HEADER_EDITS)
@example(("field", "b", "dtype", "I16"))  # a bf16 tensor relabelled as integers: diff-weights compares floats only
@example(("field", "a", "shape", [3, 2**62]))
def test_diff_weights_against_a_damaged_header_ends_in_a_result_or_one_sentence(tmp_path, edit):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        clean, damaged = Path(d) / "a.safetensors", Path(d) / "b.safetensors"
        clean.write_bytes(_mutated_safetensors(("data", 0)))
        damaged.write_bytes(_mutated_safetensors(edit))
        for a, b in ((clean, damaged), (damaged, clean)):
            try:
                json.dumps(diff_weights(a, b).to_dict())
            except UserError as e:
                assert str(e)


@settings(max_examples=25, deadline=None)
@given(_HEADER_EDITS)
def test_the_loading_path_refuses_a_damaged_header_in_one_sentence(models, tmp_path_factory, edit):
    d = _linked_copy(models("tiny-dense"), tmp_path_factory.mktemp("hdr"))
    (d / SINGLE).unlink()
    (d / SINGLE).write_bytes(_mutated_safetensors(edit))
    assert _loads_or_refuses(d) is None  # two toy tensors are never a tiny-dense model


@pytest.mark.parametrize("absurd", ["tensors", "header_length"])
def test_an_absurd_header_is_named_and_costs_little(tmp_path, monkeypatch, absurd):
    if absurd == "tensors":
        monkeypatch.setattr(container, "MAX_TENSORS", 1000)  # the rule at a size that tests quickly
        n = container.MAX_TENSORS + 1
        blob = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}).encode()
    else:  # whitespace after the JSON is allowed, so this is a valid header of an absurd length
        blob = b"{}" + b" " * container.ABSURD_HEADER
        n = len(blob)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    result, peak = peak_traced_bytes(scan_checkpoint, path)
    assert [f.numbers[absurd] for f in _errors(result, "container")] == [n]
    assert not result.tensors
    assert peak < 40 * len(blob)  # a parse at most, never per-tensor work: 10^6 entries once took 1.2 GB


# --- index files ------------------------------------------------------------------------------------

_SHARD_NAMES = st.sampled_from(
    [
        ".",
        "..",
        "",
        "/",
        "/etc/hostname",
        "../model.safetensors",
        "sub/x.safetensors",
        "pytorch_model.bin",
        "model-00001-of-00002.bin",
        "missing.safetensors",
        "x\0.safetensors",
    ]
)


@FAST
@given(
    st.one_of(
        st.tuples(st.just("value"), _SHARD_NAMES | JSON),
        st.tuples(st.just("weight_map"), JSON),
        st.tuples(st.just("raw"), st.binary(max_size=40) | NESTED.map(str.encode)),
        st.tuples(st.just("other shard"), st.integers(0, 100)),
    )
)
def test_a_malformed_index_is_refused_by_the_loader_and_reported_by_the_scan(models, tmp_path, edit):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        d = _linked_copy(models("sharded"), Path(d) / "m")
        index = json.loads((d / INDEX).read_text())
        names = sorted(index["weight_map"])
        shards = sorted(set(index["weight_map"].values()))
        if edit[0] == "value":
            index["weight_map"][names[0]] = edit[1]
        elif edit[0] == "weight_map":
            index["weight_map"] = edit[1]
        elif edit[0] == "other shard":  # a real shard, but not the one holding the tensor
            name = names[edit[1] % len(names)]
            index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
        (d / INDEX).write_bytes(edit[1] if edit[0] == "raw" else json.dumps(index).encode())
        assert _loads_or_refuses(d) is None
        assert _errors(scan_checkpoint(d))


def test_an_index_pointing_outside_the_model_directory_is_refused(models, tmp_path):
    other = _linked_copy(models("tiny-dense"), tmp_path / "other")
    d = _linked_copy(models("tiny-dense"), tmp_path / "m")
    (d / SINGLE).unlink()
    for target in (f"../other/{SINGLE}", str(other / SINGLE)):
        (d / INDEX).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": target}}))
        with pytest.raises(UserError, match="not a file in the model directory"):
            open_model(d)
        assert _errors(scan_checkpoint(d), "index")


def test_an_index_naming_bin_files_never_reaches_torch_load(models, tmp_path, monkeypatch):
    d = _linked_copy(models("tiny-dense"), tmp_path / "m")
    (d / SINGLE).rename(d / "pytorch_model.bin")  # safetensors bytes under a pickle's name
    names = list(safe_open(str(d / "pytorch_model.bin"), framework="numpy").keys())
    (d / INDEX).write_text(json.dumps({"weight_map": {n: "pytorch_model.bin" for n in names}}))

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", never)
    from helpers import cli

    assert cli("capture", "--impl", "hf", "--model", d, "--out", tmp_path / "out") == 2
    with pytest.raises(UserError, match="safetensors only"):
        open_model(d)


# --- configs ----------------------------------------------------------------------------------------

_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "torch_dtype",
    "max_position_embeddings",
    "hidden_act",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
]
_BOMBS = st.sampled_from(
    [
        10**9,
        10**18,
        2**63,
        10**8,
        0,
        -1,
        "4",
        4.0,
        [4],
        {"rope_type": "yarn"},
        "default",
        {"rope_theta": "1e6"},
        list(range(2000)),
    ]
)


@FAST
@given(
    st.sampled_from(["tiny-dense", "tiny-moe"]),
    st.dictionaries(st.sampled_from(_FIELDS), JSON | _BOMBS, min_size=1, max_size=3),
)
def test_any_config_field_of_any_type_loads_or_is_refused_in_bounded_memory(models, tmp_path, preset, changes):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        d = _linked_copy(models(preset), Path(d) / "m")
        raw = json.loads((d / "config.json").read_text()) | changes
        (d / "config.json").write_text(json.dumps(raw))
        (loaded, result), peak = peak_traced_bytes(lambda: (_loads_or_refuses(d), scan_checkpoint(d)))
        assert peak < 64 * 1024**2, changes
        if loaded is None:  # what the loader refuses, the scan reports
            assert _errors(result), changes


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(
        [("tiny-dense", "num_hidden_layers", "layers", 3), ("tiny-moe", "num_experts", "experts", 8)]
    ).flatmap(
        lambda c: st.tuples(
            st.just(c), st.integers(2, 12).filter(lambda n: n != c[3]) | st.sampled_from([10**8, 10**9, 10**15])
        )
    )
)
def test_a_config_whose_layer_or_expert_count_differs_from_the_weights_is_refused(models, tmp_path_factory, case):
    (preset, field, kind, held), declared = case
    d = _linked_copy(models(preset), tmp_path_factory.mktemp(kind))
    raw = json.loads((d / "config.json").read_text()) | {field: declared}
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=f"declares {declared} {kind}.* holds? {held}"):
        open_model(d)
    assert {f.numbers[kind] for f in _errors(scan_checkpoint(d), kind)} == {held}


# --- weights ----------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(
        [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.2.mlp.down_proj.weight",
        ]
    ),
    st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]),
)
def test_an_integer_weight_is_an_error_for_the_scan_and_the_loader(models, tmp_path_factory, name, dtype):
    d = rewrite_checkpoint(
        models("tiny-dense"), tmp_path_factory.mktemp("int"), lambda t: t | {name: (t[name] * 100).to(dtype)}
    )
    with pytest.raises(UserError, match="not floating point"):
        open_model(d)
    assert [f.tensor for f in _errors(scan_checkpoint(d), "dtype")] == [name]


# --- the file system --------------------------------------------------------------------------------


def _make_odd(path: Path, kind: str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink loop":
        path.symlink_to(path.name)
    else:
        path.symlink_to(path.parent / "nowhere")


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink loop", "dangling symlink"])
@pytest.mark.parametrize("name", [SINGLE, "extra.safetensors", "config.json", INDEX, "shard"])
def test_odd_files_are_refused_without_blocking(models, tmp_path, kind, name):
    d = _linked_copy(models("sharded" if name in (INDEX, "shard") else "tiny-dense"), tmp_path / "m")
    if name == "shard":
        name = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))[0]
    _make_odd(d / name, kind)
    with deadline(20):
        result = scan_checkpoint(d)
        loaded = _loads_or_refuses(d)
    assert _errors(result)
    assert (loaded is None) == (name != "extra.safetensors")  # a stray file the loader never reads


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink loop", "dangling symlink"])
def test_an_odd_path_given_to_the_scan_is_one_user_error(tmp_path, kind):
    path = tmp_path / "m.gguf"
    _make_odd(path, kind)
    with deadline(20), pytest.raises(UserError):
        scan_checkpoint(path)
