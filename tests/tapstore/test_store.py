import json

import pytest
import torch
from safetensors.torch import load_file

from qwen3dbg.tapstore.store import StepInfo, StoreWriter, TapStore, masked
from qwen3dbg.util.errors import UserError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]


def _tensor(dtype, shape):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape, dtype=dtype)


def test_round_trip_keeps_every_dtype_and_value_unchanged(tmp_path):
    taps = {f"t{i}": _tensor(dt, (2, 3, i + 1)) for i, dt in enumerate(DTYPES)}
    info = StepInfo(0, [[1, 2, 3], [4, 5, 6]], [[0, 1, 2], [0, 1, 2]])
    with StoreWriter(tmp_path, "test", "bf16", batch=2) as w:
        w.begin_step(info, {n: tuple(t.shape) for n, t in taps.items()})
        for n in reversed(list(taps)):  # arrival order need not follow the plan
            w(n, taps[n])
        w.end_step()
    store = TapStore.open(tmp_path)
    assert store.dtype == torch.bfloat16 and store.steps == [info]
    for n, t in taps.items():
        got = store.get(0, n)
        assert got.dtype == t.dtype and torch.equal(got, t), n
    # The streamed file is a plain safetensors file any reader accepts.
    assert set(load_file(tmp_path / "step_0000.safetensors")) == set(taps)


def test_manifest_follows_the_published_rules(tmp_path):
    with StoreWriter(tmp_path, "engine", torch.float16, batch=1, missing_taps=["attn_probs"]) as w:
        for s, (ids, pos) in enumerate([([7, 8], [0, 1]), ([9], [2])]):
            w.begin_step(StepInfo(s, [ids], [pos]), {"embed": (1, len(ids), 4)})
            w("embed", torch.zeros(1, len(ids), 4, dtype=torch.float16))
            w.end_step()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format"] == "qwen3dbg-taps/1" and m["dtype"] == "float16" and m["complete"] is True
    assert m["steps"][1] == {"step": 1, "token_ids": [[9]], "positions": [[2]]}
    assert m["missing_taps"] == ["attn_probs"]


def test_a_run_that_crashes_leaves_an_incomplete_store_that_readers_refuse(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path, "engine", "fp32", batch=1) as w:
            w.begin_step(StepInfo(0, [[1]], [[0]]), {"embed": (1, 1, 2)})
            w("embed", torch.zeros(1, 1, 2))
            w.end_step()
            w.begin_step(StepInfo(1, [[2]], [[1]]), {"embed": (1, 1, 2)})
            raise RuntimeError("engine crashed")
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    with pytest.raises(UserError, match="incomplete"):
        TapStore.open(tmp_path)
    assert TapStore.open(tmp_path, require_complete=False).steps[0].step == 0


def test_readers_accept_short_dtype_names_and_reject_other_formats(tmp_path):
    with StoreWriter(tmp_path, "x", "fp32", batch=1):
        pass
    m = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(m | {"dtype": "bf16"}))
    assert TapStore.open(tmp_path).dtype == torch.bfloat16
    (tmp_path / "manifest.json").write_text(json.dumps(m | {"format": "other/2"}))
    with pytest.raises(UserError, match="format"):
        TapStore.open(tmp_path)


def test_writer_refuses_to_overwrite_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tap store"):
        StoreWriter(tmp_path, "x", "fp32", batch=1)


def test_masked_entries_are_minus_inf_or_below_half_finfo_min():
    s = torch.tensor([0.0, -1e3, float("-inf"), torch.finfo(torch.bfloat16).min], dtype=torch.bfloat16)
    assert masked(s).tolist() == [False, False, True, True]
