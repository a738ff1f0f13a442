"""The worked tensor-parallel example for engines we do not run: candidates/c/example_engine.c run once per
rank (`--tp RANK/WORLD`) writes each rank's store through qwen3dbg_taps.h (q3t_rank, q3t_shard), the differ
gathers them, and a bug planted on one rank is named with its rank."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import C_DIR, C_FLAGS, DECODE, PROMPT, cli, compiler

from qwen3dbg.model.config import load_config
from qwen3dbg.diff import run_diff
from qwen3dbg.tapstore.store import Shard, TapStore
from qwen3dbg.tapstore.validate import validate_ranks

FLAGS = ["-std=c99", "-O2", *C_FLAGS]


def _cc() -> str:
    return compiler("cc")


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "engine"
    subprocess.run([_cc(), *FLAGS, "-o", str(out), str(C_DIR / "example_engine.c"), "-lm"], check=True)
    return out


def run_ranks(engine: Path, model: Path, out: Path, world: int, *plant: str) -> list[Path]:
    """The engine run once per rank of a TP=`world` run; the ranks' store directories."""
    dirs = []
    for rank in range(world):
        d = out / f"rank{rank}"
        ids = [",".join(map(str, PROMPT)), "--decode", ",".join(map(str, DECODE))]
        done = subprocess.run(
            [str(engine), str(model), str(d), *ids, "--tp", f"{rank}/{world}", *plant], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        dirs.append(d)
    return dirs


def diff(dirs: list[Path], model: Path):
    return run_diff("hf", "store:" + ",".join(map(str, dirs)), model_dir=model)


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_of_the_c_engine_validate_and_diff_clean(tmp_path, engine, dense, world):
    dirs = run_ranks(engine, dense, tmp_path, world)
    assert validate_ranks(dirs, load_config(dense)) == []
    assert cli("validate-store", *dirs, "--model", dense) == 0
    result = diff(dirs, dense)
    assert result.first_divergence is None, result.verdict
    assert not result.not_compared


def test_each_rank_s_manifest_says_its_rank_and_layout(tmp_path, engine, dense):
    rank1 = TapStore.open(run_ranks(engine, dense, tmp_path, 2)[1]).rank
    assert (rank1.rank, rank1.world_size) == (1, 2)
    assert rank1.shard("layers.0.q_proj") == Shard("split", 2, 64, 128)  # heads 2..3 of 4, head_dim 32
    assert rank1.shard("layers.2.k_cache") == Shard("split", 1, 1, 2)
    assert rank1.shard("layers.1.mlp.act") == Shard("split", 2, 80, 160)
    assert rank1.shard("layers.0.mlp.out") == Shard("partial") and rank1.shard("resid_mid") == Shard("replicated")


def test_a_whole_run_of_the_c_engine_writes_no_rank_fields(tmp_path, engine, dense):
    out = tmp_path / "whole"
    ids = [",".join(map(str, PROMPT)), "--decode", ",".join(map(str, DECODE))]
    subprocess.run([str(engine), str(dense), str(out), *ids], check=True)
    assert not {"rank", "world_size", "shards"} & json.loads((out / "manifest.json").read_text()).keys()


def test_a_wrong_kv_head_offset_on_rank_1_is_named_with_its_rank(tmp_path, engine, dense):
    d = diff(run_ranks(engine, dense, tmp_path, 2, "--plant-kv-offset", "1"), dense).first_divergence
    assert (d.step, d.tap) == (0, "layers.0.k_proj")
    assert "confined to rank 1's slice (kv head 1)" in d.reason


def test_a_partial_sum_scaled_on_rank_1_is_named_a_partial_sum_fault(tmp_path, engine, dense):
    dirs = run_ranks(engine, dense, tmp_path, 2, "--plant-partial-scale", "1")
    out = tmp_path / "d.json"
    assert cli("diff", "--cand", "store:" + ",".join(map(str, dirs)), "--model", dense, "--json", out) == 1
    first = json.loads(out.read_text())["first_divergence"]
    assert (first["step"], first["tap"]) == (0, "layers.0.o_proj")
    assert "the sum of the 2 ranks' partial sums is off" in first["reason"]
    assert (
        "rank 1's partial" in first["reason"] and "as if that partial were 0.5x what the sum needs" in first["reason"]
    )
    assert first["ranks"]["kind"] == "partial" and first["ranks"]["rank"] == [1]


MISUSES = {
    "a layout before the rank": ('q3t_shard(s, "o_proj", Q3T_PARTIAL, 0, 0, 0)', "call q3t_rank first"),
    "a rank outside the world": ("q3t_rank(s, 2, 2)", "0 <= rank < world_size"),
    "an empty slice": (
        'q3t_rank(s, 0, 2) || q3t_shard(s, "q_proj", Q3T_SPLIT, 2, 64, 64)',
        "a split needs an axis >= 0 and 0 <= start < stop",
    ),
}


@pytest.mark.parametrize("case", list(MISUSES))
def test_the_header_refuses_a_misused_layout_call(tmp_path, case):
    call, expected = MISUSES[case]
    src = tmp_path / "misuse.c"
    src.write_text(
        '#define QWEN3DBG_TAPS_IMPLEMENTATION\n#include "qwen3dbg_taps.h"\n#include <stdio.h>\n'
        f'int main(void) {{ q3t_store *s = q3t_open("{tmp_path}", "x", "float32", 1);\n'
        f'  int rc = {call};\n  printf("%d %s\\n", rc, q3t_error(s)); q3t_abandon(s); return 0; }}\n'
    )
    exe = tmp_path / "misuse"
    subprocess.run([_cc(), *FLAGS, "-I", str(C_DIR), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert not out.startswith("0 ") and expected in out


def test_the_rank_manifest_the_header_writes_is_json_with_every_layout_kind(tmp_path):
    src = tmp_path / "kinds.c"
    src.write_text(
        '#define QWEN3DBG_TAPS_IMPLEMENTATION\n#include "qwen3dbg_taps.h"\n'
        f'int main(void) {{ q3t_store *s = q3t_open("{tmp_path}", "x", "float32", 1);\n'
        '  int rc = q3t_rank(s, 1, 4) || q3t_shard(s, "q_proj", Q3T_SPLIT, 2, 32, 64)\n'
        '        || q3t_shard(s, "layers.0.o_proj", Q3T_PARTIAL, 0, 0, 0)\n'
        '        || q3t_shard(s, "embed", Q3T_REPLICATED, 0, 0, 0);\n'
        "  q3t_abandon(s); return rc; }\n"
    )
    exe = tmp_path / "kinds"
    subprocess.run([_cc(), *FLAGS, "-I", str(C_DIR), "-o", str(exe), str(src)], check=True)
    subprocess.run([str(exe)], check=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["rank"], m["world_size"]) == (1, 4)
    assert m["shards"] == {
        "q_proj": {"axis": 2, "start": 32, "stop": 64},
        "layers.0.o_proj": "partial",
        "embed": "replicated",
    }


def test_the_engine_refuses_a_world_size_that_does_not_divide_the_heads(tmp_path, engine, dense):
    done = subprocess.run(
        [str(engine), str(dense), str(tmp_path / "r"), "1,2", "--tp", "0/3"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "world size must divide" in done.stderr
    shutil.rmtree(tmp_path / "r", ignore_errors=True)
