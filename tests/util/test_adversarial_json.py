"""Bounded JSON reading: any nesting, any bytes, any file kind ends in a value or one JSONReadError/OSError."""

from __future__ import annotations

import json
import os

import pytest
from helpers import deadline, peak_traced_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3dbg.util.jsonio import MAX_DEPTH, JSONReadError, loads, nesting_depth, read_json

# strings full of what a depth counter could mistake for structure
_TRICKY = st.text(alphabet=st.sampled_from(list('[]{}"\\:,ab\n\u00e9\U0001f600')), max_size=12)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY, inner, max_size=4),
    max_leaves=40,
)


def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


@settings(max_examples=120, deadline=None)
@given(_VALUES, st.booleans())
def test_depth_counts_structure_and_never_brackets_inside_strings(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(text) == _depth(value)
    assert loads(text) == value


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["[", '{"k":', '{"[":', '["]",']), min_size=1, max_size=400), _VALUES)
def test_any_nesting_parses_or_is_refused_by_depth_never_recursion(openers, leaf):
    closers = {"[": "]", '{"k":': "}", '{"[":': "}", '["]",': "]"}
    text = "".join(openers) + json.dumps(leaf) + "".join(closers[o] for o in reversed(openers))
    depth = len(openers) + _depth(leaf)
    if depth <= MAX_DEPTH:
        assert nesting_depth(text.encode()) == depth
        loads(text)
    else:
        with pytest.raises(JSONReadError, match=f"{depth} levels deep"):
            loads(text)


def test_thousands_deep_is_refused_without_recursion():
    for opener in ("[", '{"a":', '[{"a":'):
        with pytest.raises(JSONReadError, match="levels deep"):
            loads(opener * 100_000)


@settings(max_examples=120, deadline=None)
@given(
    st.binary(max_size=64)
    | _VALUES.map(lambda v: json.dumps(v).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff\x00[{\\"[i % 5 :] + b[i:])
    )
)
def test_arbitrary_bytes_give_a_value_or_one_json_read_error(data):
    try:
        loads(data)
    except JSONReadError as e:
        assert str(e)


@given(st.integers(0xD800, 0xDFFF), st.sampled_from(['"{}"', '{{"{}": 1}}', '["ok", "x{}"]']))
def test_a_lone_surrogate_escape_is_refused(code, template):
    with pytest.raises(JSONReadError, match="surrogate"):
        loads(template.format(f"\\u{code:04x}"))


def test_a_surrogate_pair_is_text():
    assert loads('"\\ud83d\\ude00"') == "\U0001f600"


def test_invalid_utf8_is_refused_with_its_byte():
    with pytest.raises(JSONReadError, match="not UTF-8.*byte 7"):
        loads(b'{"a": "\xc3\x28"}')


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink loop", "dangling symlink"])
def test_read_json_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, kind):
    path = tmp_path / "config.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        path.symlink_to(path)
    else:
        path.symlink_to(tmp_path / "absent.json")
    with deadline(10), pytest.raises(OSError):
        read_json(path)


def test_read_json_refuses_an_oversized_file_before_reading_it(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(JSONReadError, match="bytes, more than"):
        read_json(path, max_bytes=100)
    assert read_json(path) == [0] * 1001


def test_read_json_allocates_what_the_file_holds_not_its_limit(tmp_path):
    path = tmp_path / "small.json"
    path.write_text('{"a": [1, 2, 3]}')
    assert peak_traced_bytes(read_json, path)[1] < 1024**2
