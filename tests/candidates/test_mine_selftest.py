"""`qwen3dbg selftest` on the CPU (the GPU run is the same code with a twin column): one row per tap of
the schema, and speed rows for mine and both HF attention paths."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwen3dbg.cli import app
from qwen3dbg.model.config import load_config
from qwen3dbg.tapstore.schema import forward_index


def test_selftest_on_cpu_reports_every_tap_and_the_speed_of_each_implementation(models, tmp_path):
    model = models("tiny-dense")
    out = tmp_path / "selftest.json"
    result = CliRunner().invoke(
        app,
        [
            "selftest",
            "--device",
            "cpu",
            "--model",
            str(model),
            "--prompt-tokens",
            "4",
            "--decode-steps",
            "2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [row["tap"] for row in doc["taps"]] == list(forward_index(load_config(model)))
    assert all(row["ulps_vs_twin"] is None for row in doc["taps"]), "on the CPU the engine is the twin"
    assert doc["store_identical"] and doc["uncaptured_identical"] and doc["problems"] == []
    assert [row["impl"] for row in doc["speed"]] == [
        "mine (cpu)",
        "mine (cpu, capture to a store)",
        "hf eager",
        "hf sdpa",
    ]
    assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 for row in doc["speed"])


@pytest.mark.parametrize(
    "preset, dtype", [("tiny-dense", "bfloat16"), ("tiny-moe", "bfloat16"), ("tiny-dense", "float32")]
)
def test_emulated_cuda_kernels_give_the_twins_bits_on_every_tap(models, tmp_path, preset, dtype):
    """The CUDA kernels themselves (their indexing, shared memory, barriers and shuffles), run on the CPU
    by cuda_emu.h: CI's check of the GPU path's logic, where no GPU is."""
    out = tmp_path / "selftest.json"
    result = CliRunner().invoke(
        app, ["selftest", "--device", "emulated", "--model", str(models(preset)), "--dtype", dtype, "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["device"] == "emulated" and doc["problems"] == [] and doc["speed"] == []
    assert all(row["ulps_vs_twin"] == 0 for row in doc["taps"])
