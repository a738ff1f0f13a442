"""The hf capture against the transformers versions it accepts: the declared range is the one it checks,
a version outside it is refused in one sentence, and nothing depends on the router's output order."""

import itertools
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import cli
from qwen3dbg.reference.hf import SUPPORTED_TRANSFORMERS, check_transformers_version, router_outputs

from qwen3dbg.util.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_declares_the_range_the_capture_checks():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in deps
    assert "<" in SUPPORTED_TRANSFORMERS, "an upper bound: a newer transformers may move what we tap"
    assert SUPPORTED_TRANSFORMERS in (ROOT / "README.md").read_text()


def test_the_installed_transformers_is_accepted():
    import transformers

    check_transformers_version(transformers.__version__)


@pytest.mark.parametrize("version", ["4.57.6", "5.0.0rc1", "5.25.0", "5.25.0.dev0", "6.0.0"])
def test_a_transformers_outside_the_range_is_refused_with_the_install_command(version):
    with pytest.raises(UserError, match=rf"transformers {version} is outside .*pip install"):
        check_transformers_version(version)


def test_capture_under_an_untested_transformers_exits_2(models, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert cli("capture", "--impl", "hf", "--model", models("tiny-dense"), "--out", tmp_path / "o") == 2


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_router_ids_and_weights_are_found_by_dtype_in_any_output_order(order):
    first = torch.randn(5, 8)  # the logits, or before 5.6 their softmax
    weights, ids = torch.rand(5, 2), torch.randint(0, 8, (5, 2))
    outputs = tuple((first, weights, ids)[i] for i in order)
    found_ids, found_weights = router_outputs(outputs, top_k=2)
    assert found_ids is ids and found_weights is weights


def test_a_router_without_one_id_tensor_is_refused():
    with pytest.raises(UserError, match="router"):
        router_outputs((torch.randn(5, 8), torch.rand(5, 2), torch.rand(5, 2)), top_k=2)
