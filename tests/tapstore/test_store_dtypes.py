"""A store's manifest dtype against the dtype its tap files hold: a tap may be more precise than the manifest
says (compared as stored), never less (the manifest's tolerances would read its rounding as a divergence)."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3dbg.diff import run_diff
from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.run.registry import load_candidate
from qwen3dbg.tapstore.validate import FLOAT_STORE_DTYPES, validate_store
from qwen3dbg.util.errors import UserError


@pytest.fixture(scope="module")
def captured(models, tmp_path_factory):
    model = models("tiny-dense")
    out = capture(
        load_candidate("scratch", model, "float64"), forced_steps([3, 1, 4], [5]), tmp_path_factory.mktemp("s") / "s"
    )
    return model, out


def _relabelled(src, dst, manifest_dtype: str, tap_dtype: torch.dtype):
    shutil.copytree(src, dst)
    for f in dst.glob("step_*.safetensors"):
        save_file({n: t.to(tap_dtype) if t.is_floating_point() else t for n, t in load_file(f).items()}, f)
    m = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**m, "dtype": manifest_dtype}))
    return dst


@pytest.mark.parametrize("manifest,taps", list(itertools.permutations(FLOAT_STORE_DTYPES, 2)))
def test_taps_less_precise_than_the_manifest_says_are_a_problem_and_more_precise_ones_are_not(
    captured, tmp_path, manifest, taps
):
    store = _relabelled(captured[1], tmp_path / "s", manifest, getattr(torch, taps))
    problems = validate_store(store)
    coarser = torch.finfo(getattr(torch, taps)).eps > torch.finfo(getattr(torch, manifest)).eps
    assert [p.where for p in problems] == (["step 0", "step 1"] if coarser else [])
    assert all(f"stored in {taps}" in p.message and f"manifest's dtype {manifest}" in p.message for p in problems)


def test_a_float32_manifest_over_bfloat16_taps_is_refused_as_bad_input_not_diffed(captured, tmp_path):
    model, src = captured
    store = _relabelled(src, tmp_path / "s", "float32", torch.bfloat16)
    with pytest.raises(UserError, match="less precise than the manifest's dtype float32"):
        run_diff("hf", f"store:{store}", model_dir=model)
