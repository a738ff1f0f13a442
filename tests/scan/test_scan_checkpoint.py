"""scan-checkpoint on synthetic checkpoints: planted anomalies, config mismatches and broken files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import edit_safetensors_header, rewrite_checkpoint

from qwen3dbg.model.gguf_io import write_gguf
from qwen3dbg.model.gguf_names import hf_to_gguf
from qwen3dbg.model.layout import INDEX, tensor_shapes
from qwen3dbg.model.synth import PRESETS, Plants, make_model
from qwen3dbg.scan.checks import Thresholds
from qwen3dbg.scan.scan import scan_checkpoint


def _found(result, check):
    return {f.tensor: f for f in result.findings if f.check == check}


def _severities(result):
    return {(f.severity, f.check) for f in result.findings}


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "sharded"])
def test_clean_synthetic_checkpoint_has_no_findings(models, preset):
    result = scan_checkpoint(models(preset), fail_on="warning")
    assert result.findings == [] and result.exit_code == 0
    assert all(t.stats is not None for t in result.tensors)


def test_clean_gguf_conversion_has_no_error(models, tmp_path):
    result = scan_checkpoint(write_gguf(models("tiny-moe"), tmp_path / "m.gguf", "q8_0"))
    assert result.exit_code == 0 and result.format == "gguf"
    assert {f.check for f in result.findings} == {"dtype"}  # the note listing GGUF tensor types


L0 = "model.layers.0."
PLANTS = {  # plant -> (severity, check, tensors it must name)
    "k_norm_peak": (
        Plants(k_norm_peak=96.5),
        "warning",
        "norm-danger",  # the peak halves per layer
        {f"model.layers.{i}.self_attn.k_norm.weight" for i in range(3) if 96.5 * 0.5**i > 20},
    ),
    "q_norm_peak": (
        Plants(q_norm_peak=40.0),
        "warning",
        "norm-danger",
        {f"model.layers.{i}.self_attn.q_norm.weight" for i in range(3)},
    ),
    "ghost_bias": (
        Plants(ghost_bias=0.02),
        "error",
        "ghost-bias",
        {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(3) for p in "qkvo"},
    ),
    "nonfinite": (Plants(nonfinite=(L0 + "mlp.up_proj.weight",)), "error", "nonfinite", {L0 + "mlp.up_proj.weight"}),
    "huge": (Plants(huge=(L0 + "self_attn.o_proj.weight",)), "error", "huge", {L0 + "self_attn.o_proj.weight"}),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {name: make_model(root / name, "tiny-dense", plants=p) for name, (p, *_) in PLANTS.items()}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_anomaly_is_reported_with_its_severity(planted, plant):
    _, severity, check, tensors = PLANTS[plant]
    result = scan_checkpoint(planted[plant])
    found = _found(result, check)
    assert set(found) == tensors
    assert {f.severity for f in found.values()} == {severity}
    assert result.exit_code == (severity == "error")
    assert replace(result, fail_on="warning").exit_code == 1


@pytest.mark.parametrize("plant", ["k_norm_peak", "nonfinite"])
def test_planted_anomaly_survives_gguf_conversion(planted, plant, tmp_path):
    _, severity, check, tensors = PLANTS[plant]
    result = scan_checkpoint(write_gguf(planted[plant], tmp_path / "m.gguf", "f16"))
    assert set(_found(result, check)) == {hf_to_gguf(t)[0] for t in tensors}


def test_norm_danger_numbers_and_message(planted):
    f = _found(scan_checkpoint(planted["k_norm_peak"]), "norm-danger")[L0 + "self_attn.k_norm.weight"]
    assert f.numbers["absmax"] == 96.5 and f.numbers["layer"] == 0
    assert "96x larger" in f.message


def test_norm_threshold_is_configurable(planted):
    assert not _found(scan_checkpoint(planted["k_norm_peak"], Thresholds(norm=100.0)), "norm-danger")


def test_ghost_bias_is_not_also_called_unexpected(planted):
    assert not _found(scan_checkpoint(planted["ghost_bias"]), "unexpected")


def test_an_attention_norm_fails_from_where_one_bf16_rounding_moves_logits_by_1(tmp_path):
    """1/u(bf16) is where a rounding of the normalized keys or queries, scaled by the norm weight, reaches 1
    in an attention logit; the 0.6B preset's (and released checkpoints') k_norm of 96.5 stays below it."""
    limit = 2 / torch.finfo(torch.bfloat16).eps
    for peak, q_peak in ((limit - 4, None), (limit, None), (500.0, None), (96.5, limit + 4)):
        result = scan_checkpoint(
            make_model(tmp_path / f"{peak}-{q_peak}", "tiny-dense", plants=Plants(k_norm_peak=peak, q_norm_peak=q_peak))
        )
        errors = {f.tensor for f in result.findings if f.severity == "error"}
        k = {f"{L0}self_attn.k_norm.weight"} if peak >= limit else set()  # the peak halves per layer
        q = {f"model.layers.{i}.self_attn.q_norm.weight" for i in range(3)} if q_peak else set()
        assert errors == k | q and result.exit_code == bool(errors)


def test_norm_peaks_table_has_every_layer(models):
    result = scan_checkpoint(models("big-k-norm"))
    k = {p.layer: p.absmax for p in result.norm_peaks if p.kind == "k_norm"}
    assert k == {0: 96.5, 1: 48.25, 2: 24.125}


# --- against the config ---


def _edited(models, tmp_path, edit, preset="tiny-dense"):
    return scan_checkpoint(rewrite_checkpoint(models(preset), tmp_path / "edited", edit))


def test_missing_reshaped_and_unexpected_tensors(models, tmp_path):
    def edit(t):
        del t[L0 + "mlp.down_proj.weight"]
        t[L0 + "mlp.gate_proj.weight"] = t[L0 + "mlp.gate_proj.weight"].T
        t["model.layers.0.mlp.extra.weight"] = torch.ones(3)
        return t

    result = _edited(models, tmp_path, edit)
    assert _found(result, "missing")[L0 + "mlp.down_proj.weight"].severity == "error"
    assert _found(result, "shape")[L0 + "mlp.gate_proj.weight"].severity == "error"
    assert _found(result, "unexpected")["model.layers.0.mlp.extra.weight"].severity == "error"


def test_stored_lm_head_of_tied_model(models, tmp_path):
    equal = _edited(models, tmp_path / "eq", lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    assert _found(equal, "tied")["lm_head.weight"].severity == "info"
    other = _edited(models, tmp_path / "ne", lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"] * 2})
    assert _found(other, "tied")["lm_head.weight"].severity == "warning"


def test_mixed_dtypes_warn(models, tmp_path):
    result = _edited(models, tmp_path, lambda t: t | {"model.norm.weight": t["model.norm.weight"].float()})
    assert ("warning", "dtype") in _severities(result)


def test_dropped_expert_is_counted(models, tmp_path):
    def edit(t):
        return {n: v for n, v in t.items() if ".experts.7." not in n or not n.startswith("model.layers.1.")}

    result = _edited(models, tmp_path, edit, "tiny-moe")
    experts = [f for f in result.findings if f.check == "experts"]
    assert [f.numbers["layer"] for f in experts] == [1] and experts[0].numbers["experts"] == 7


def test_all_zero_and_constant_tensors(models, tmp_path):
    result = _edited(
        models,
        tmp_path,
        lambda t: (
            t
            | {
                L0 + "mlp.up_proj.weight": torch.zeros_like(t[L0 + "mlp.up_proj.weight"]),
                L0 + "mlp.gate_proj.weight": torch.full_like(t[L0 + "mlp.gate_proj.weight"], 0.5),
            }
        ),
    )
    assert _found(result, "zero")[L0 + "mlp.up_proj.weight"].severity == "error"
    assert _found(result, "constant")[L0 + "mlp.gate_proj.weight"].severity == "warning"


# --- broken files: findings, never a crash ---


@pytest.fixture
def copy_of(models, tmp_path):
    import shutil

    def copy(preset):
        return shutil.copytree(models(preset), tmp_path / preset)

    return copy


def _container_errors(result):
    return [f for f in result.findings if f.check in ("container", "index") and f.severity == "error"]


def test_truncated_file_reports_the_lost_tensors_and_scans_the_rest(copy_of):
    d = copy_of("tiny-dense")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    result = scan_checkpoint(d)
    lost = {x.tensor for x in _container_errors(result)}
    assert lost and result.exit_code == 1
    assert not lost & set(_found(result, "missing"))  # reported once, as damage
    assert len(result.tensors) + len(lost) == len(tensor_shapes(PRESETS["tiny-dense"].config))


def test_header_lying_about_offsets(copy_of):
    d = copy_of("tiny-dense")

    def overlap(h):
        a, b = L0 + "mlp.up_proj.weight", L0 + "mlp.down_proj.weight"
        h[b]["data_offsets"] = h[a]["data_offsets"]
        return h

    edit_safetensors_header(d / "model.safetensors", overlap)
    result = scan_checkpoint(d)
    assert {f.tensor for f in _container_errors(result)} >= {L0 + "mlp.down_proj.weight"}


def test_offsets_past_the_end(copy_of):
    d = copy_of("tiny-dense")

    def beyond(h):
        b, e = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [b + 10**9, e + 10**9]
        return h

    edit_safetensors_header(d / "model.safetensors", beyond)
    assert "model.norm.weight" in {f.tensor for f in _container_errors(scan_checkpoint(d))}


@pytest.mark.parametrize("damage", ["length_past_end", "not_json", "tiny"])
def test_unreadable_header_is_one_error_not_a_crash(copy_of, damage):
    import struct

    d = copy_of("tiny-dense")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(
        {
            "length_past_end": struct.pack("<Q", len(raw)) + raw[8:],
            "not_json": raw[:8] + b"#" + raw[9:],
            "tiny": raw[:5],
        }[damage]
    )
    result = scan_checkpoint(d)
    assert len(_container_errors(result)) == 1 and result.tensors == [] and result.exit_code == 1


def test_missing_shard_is_one_error_and_the_other_shards_are_scanned(copy_of):
    d = copy_of("sharded")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    result = scan_checkpoint(d)
    errors = _container_errors(result)
    assert [f.tensor for f in errors] == [shards[1].name]
    assert not _found(result, "missing")
    index = json.loads((d / INDEX).read_text())["weight_map"]
    assert len(result.tensors) == sum(s != shards[1].name for s in index.values())


def test_truncated_gguf(models, tmp_path):
    p = write_gguf(models("tiny-dense"), tmp_path / "m.gguf", "f16")
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 1000])
    result = scan_checkpoint(p)
    assert _container_errors(result) and result.tensors and result.exit_code == 1


def test_single_safetensors_file_is_scanned_without_a_config(models):
    result = scan_checkpoint(models("tiny-dense") / "model.safetensors")
    assert [(f.severity, f.check) for f in result.findings] == [("info", "config")]
    assert len(result.tensors) == len(tensor_shapes(PRESETS["tiny-dense"].config))


def test_gguf_header_damage_is_an_error_finding(models, tmp_path):
    p = write_gguf(models("tiny-dense"), tmp_path / "m.gguf", "f16")
    p.write_bytes(p.read_bytes()[:300])
    result = scan_checkpoint(p)
    assert len(_container_errors(result)) == 1 and result.tensors == [] and result.exit_code == 1


def test_tensor_at_an_unaligned_offset_is_read_correctly(models, copy_of):
    import struct

    d = copy_of("tiny-dense")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob) % 8) + 1)  # one byte more: every tensor starts at an odd address
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    odd, clean = scan_checkpoint(d), scan_checkpoint(models("tiny-dense"))
    assert odd.findings == [] and [t.stats for t in odd.tensors] == [t.stats for t in clean.tensors]


def test_a_safetensors_scan_does_not_load_torch(models):
    """Scanning runs at the speed of the disk: no second of importing torch before the first byte."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from qwen3dbg.scan.scan import scan_checkpoint; "
        "from qwen3dbg.scan.checks import Thresholds; "
        f"scan_checkpoint(Path({str(models('tiny-dense'))!r}), Thresholds(), None); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
