"""`--cand vllm:tp=2`: vLLM's tensor parallelism over two worker processes, each rank's taps gathered while they
stream, and a bug planted on one rank named with its rank (candidates/vllm/ranks.py, channel.py).

Marked `vllm` like tests/candidates/test_vllm.py. A patch runs in vLLM's worker processes only (spawned for each
engine), so planted runs need no interpreter of their own. About 50 s a run on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from qwen3dbg.diff import run_diff

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None and os.environ.get("CI") != "true",
        reason="vLLM is not installed here: run .ci/install_vllm.sh and pytest -m vllm in its venv",
    ),
    pytest.mark.skipif(
        len(os.sched_getaffinity(0)) < 2 and os.environ.get("CI") != "true",
        reason="vllm:tp=2 runs a worker per rank on a core of its own",
    ),
]

from test_vllm import DECODE, PATCHES, PROMPT  # noqa: E402


def diff(model, cand: str):
    return run_diff("hf", cand, model_dir=model, dtype="bfloat16", token_ids=PROMPT, decode_ids=DECODE).to_dict()


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_tp2_is_clean_and_every_tap_is_gathered_from_both_ranks(models, preset):
    """Each rank's q/k/v, norms, rope, cache, attention output and MLP columns are its slice of heads or
    channels, o_proj (and a dense down_proj) a partial sum before the all-reduce, the rest replicated copies
    that agree: gathered, every tap vLLM computes is within HF's noise floor."""
    r = diff(models(preset), "vllm:tp=2")
    assert r["first_divergence"] is None, r["first_divergence"]
    layouts = {t["name"]: t["extra"]["ranks"] for t in r["taps"] if t["step"] == 0 and t["status"] == "ok"}
    assert all(v["world_size"] == 2 for v in layouts.values())
    kinds = {name.removeprefix("layers.0."): v["kind"] for name, v in layouts.items() if name.startswith("layers.0.")}
    for op in ("q_proj", "k_proj", "v_proj", "q_norm", "k_rope", "k_cache", "attn_out"):
        assert kinds[op] == "split", op
    assert kinds["o_proj"] == "partial" and kinds["resid_mid"] == "replicated"
    if preset == "tiny-moe":  # the router and the expert choice on every rank, the MoE block's output reduced
        assert {kinds[op] for op in ("moe.router_logits", "moe.topk_ids", "moe.topk_weights", "mlp.out")} == {
            "replicated"
        }
    else:
        assert (kinds["mlp.gate"], kinds["mlp.act"], kinds["mlp.out"]) == ("split", "split", "partial")
    assert {t["op"] for t in r["taps"] if t["status"] == "not_compared"} == {"attn_scores", "attn_probs"}


def test_a_wrong_kv_head_offset_on_rank_1_is_named_with_its_rank_and_slice(models):
    r = diff(models("tiny-dense"), f"vllm:tp=2,patch={PATCHES / 'tp_kv_offset.py'}")
    first = r["first_divergence"]
    assert (first["step"], first["layer"], first["tap"]) == (0, 0, "layers.0.k_proj")
    assert first["ranks"]["rank"] == [1] and first["ranks"]["slice"] == "kv head 1"


def test_a_partial_sum_doubled_on_rank_1_is_named_a_partial_sum_fault_of_rank_1(models):
    r = diff(models("tiny-dense"), f"vllm:tp=2,patch={PATCHES / 'tp_partial_scaled.py'}")
    first = r["first_divergence"]
    assert (first["step"], first["layer"], first["tap"]) == (0, 0, "layers.0.o_proj")
    assert first["ranks"]["kind"] == "partial" and first["ranks"]["rank"] == [1]
    assert first["ranks"]["factor"] == pytest.approx(0.5, abs=0.01)  # the error is half the doubled partial


def test_a_tp1_worker_process_runs_the_patch_and_hands_whole_taps(models):
    """`workers=1`: vLLM's worker in a process of its own (the patch runs there, before the model loads), its
    taps over the same channel, handed on whole: a RoPE bug is found at its op with no rank to name."""
    r = diff(models("tiny-dense"), f"vllm:workers=1,patch={PATCHES / 'rope_theta_1e4.py'}")
    first = r["first_divergence"]
    assert (first["step"], first["layer"], first["tap"]) == (0, 0, "layers.0.q_rope")
    assert not first["ranks"] and not any("ranks" in t["extra"] for t in r["taps"])


def test_with_more_ranks_than_kv_heads_each_kv_head_is_a_copy_on_the_ranks_that_replicate_it():
    """The layouts read from vLLM's layer attributes at tp=4 over tiny-dense's 4 query and 2 kv heads (which
    vLLM's QKVParallelLinear holds as num_heads=1, num_kv_heads=1, num_kv_head_replicas=2 on each rank): the
    query heads are covered once, each kv head is held whole by two ranks."""
    from types import SimpleNamespace as NS

    from qwen3dbg.candidates.vllm.ranks import layouts
    from qwen3dbg.tapstore.store import Shard

    def model(rank: int):
        tp = dict(tp_size=4, tp_rank=rank)
        layer = NS(
            self_attn=NS(
                qkv_proj=NS(num_heads=1, num_kv_heads=1, num_kv_head_replicas=2, head_size=32, **tp),
                o_proj=NS(input_size_per_partition=32, reduce_results=True, **tp),
            ),
            mlp=NS(
                gate_up_proj=NS(output_sizes=[160, 160], **tp),
                down_proj=NS(input_size_per_partition=40, reduce_results=True, **tp),
            ),
        )
        return NS(model=NS(layers=[layer]), logits_processor=NS(use_all_gather=True))

    shards = [layouts(model(r)) for r in range(4)]
    assert [s["layers.0.q_proj"] for s in shards] == [Shard("split", 2, 32 * r, 32 * (r + 1)) for r in range(4)]
    assert [s["layers.0.k_rope"] for s in shards] == [Shard("split", 2, h, h + 1) for h in (0, 0, 1, 1)]
    assert [s["layers.0.v_cache"] for s in shards] == [Shard("split", 1, h, h + 1) for h in (0, 0, 1, 1)]
    assert [s["layers.0.mlp.up"] for s in shards] == [Shard("split", 2, 40 * r, 40 * (r + 1)) for r in range(4)]
    assert all(s["layers.0.o_proj"] == s["layers.0.mlp.out"] == Shard("partial") for s in shards)
    assert "layers.0.resid_mid" not in shards[0]  # replicated: no entry
