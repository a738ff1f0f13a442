"""Tensor-parallel runs: the stores of a run's ranks (docs/taps.md, "Tensor-parallel runs") gathered by the
differ, the rank of a divergence named, and validate-store on rank stores alone and together.

The rank stores here are cut from a float32 capture of scratch by a layout table (a generated TP engine whose
every rank is exact), so any divergence is one a test planted on one rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import DECODE, PROMPT, cli

from qwen3dbg.run.capture import capture, forced_steps
from qwen3dbg.model.config import load_config, parse_config
from qwen3dbg.diff import run_diff
from qwen3dbg.tapstore.shards import Part, gather, partial_fits, slice_words
from qwen3dbg.util.errors import UserError
from qwen3dbg.reference.qwen3 import Qwen3Reference
from qwen3dbg.tapstore.store import RankInfo, Shard, StoreWriter, TapStore
from qwen3dbg.tapstore.schema import tap_spec
from qwen3dbg.tapstore.validate import coverage_problem, validate_ranks, validate_store

#: op -> (axis, unit): the axis a column-parallel tap is split along, and the elements of one head (1: channels)
HEADS = {
    "q_proj": (2, "D"),
    "k_proj": (2, "D"),
    "v_proj": (2, "D"),
    "q_norm": (2, 1),
    "k_norm": (2, 1),
    "q_rope": (2, 1),
    "k_rope": (2, 1),
    "k_cache": (1, 1),
    "v_cache": (1, 1),
    "attn_scores": (1, 1),
    "attn_probs": (1, 1),
    "attn_out": (2, "D"),
}
CHANNELS = {"mlp.gate": (2, 1), "mlp.up": (2, 1), "mlp.act": (2, 1)}
PARTIALS = ("o_proj", "mlp.out")
#: the layouts a generated TP engine may take: attention only split, or the Megatron layout of every layer
LAYOUTS = {"heads": (HEADS, ()), "megatron": ({**HEADS, **CHANNELS}, PARTIALS)}


@pytest.fixture(scope="module")
def dense(models) -> Path:
    return models("tiny-dense")


@pytest.fixture(scope="module")
def whole(dense, tmp_path_factory) -> Path:
    """A float32 capture of scratch: the whole run the rank stores are cut from."""
    out = tmp_path_factory.mktemp("whole") / "store"
    return capture(Qwen3Reference(dense, "float32"), forced_steps(PROMPT, DECODE), out)


@pytest.fixture(scope="module")
def moe_whole(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_whole") / "store"
    return capture(Qwen3Reference(models("tiny-moe"), "float32"), forced_steps(PROMPT, DECODE), out)


def rank_shards(layout: str, world: int, rank: int, sizes: dict[str, int], head_dim: int) -> dict[str, Shard]:
    """Rank `rank`'s layout: its share of the heads or channels of each split op (the one head it shares with
    other ranks where there are fewer heads than ranks), and the partial sums."""
    split, partial = LAYOUTS[layout]
    shards = {op: Shard("partial") for op in partial}
    for op, (axis, unit) in split.items():
        if op not in sizes:
            continue
        unit = head_dim if unit == "D" else unit
        n = sizes[op] // unit
        lo = n * rank // world
        hi = n * (rank + 1) // world if n >= world else lo + 1
        shards[op] = Shard("split", axis, lo * unit, hi * unit)
    return shards


def cut(whole: Path, out: Path, layout: str, world: int, edit=lambda rank, name, t: t) -> list[Path]:
    """The stores of `world` ranks cut from the whole run's store: slices of split taps, whole copies of the
    others, and for partial sums each element owned by one rank at random (the others hold 0 there), so the
    ranks' addends differ and sum exactly. `edit(rank, name, tensor)` plants a bug in what one rank writes."""
    store = TapStore.open(whole)
    cfg = store.manifest["config"]
    config = parse_config(cfg)
    specs = {op: (tap_spec(config, f"layers.0.{op}", 1, 1, 1), axis) for op, (axis, _) in {**HEADS, **CHANNELS}.items()}
    sizes = {op: spec.shape[axis] for op, (spec, axis) in specs.items() if spec is not None}  # a MoE has no mlp.gate
    dirs = []
    for rank in range(world):
        info = RankInfo(rank, world, rank_shards(layout, world, rank, sizes, cfg["head_dim"]))
        d = out / f"rank{rank}"
        with StoreWriter(d, "cut", store.dtype, 1, rank=info, extra={"config": cfg}) as w:
            for st in store.steps:
                taps = {
                    n: edit(rank, n, _held(info.shard(n), store.get(st.step, n), rank, world))
                    for n in store.names(st.step)
                }
                w.begin_step(st, {n: tuple(t.shape) for n, t in taps.items()})
                for n, t in taps.items():
                    w(n, t)
                w.end_step()
        dirs.append(d)
    return dirs


def _held(shard: Shard, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if shard.kind == "split":
        return t.narrow(shard.axis, shard.start, shard.stop - shard.start).contiguous()
    if shard.kind == "partial":
        owner = torch.randint(0, world, t.shape, generator=torch.Generator().manual_seed(7))
        return torch.where(owner == rank, t, torch.zeros_like(t))
    return t


def diff(dirs: list[Path], model: Path):
    return run_diff("hf", "store:" + ",".join(map(str, dirs)), model_dir=model)


def scaled(on_rank: int, name: str, factor: float = 1.5):
    return lambda rank, n, t: t * factor if (rank, n) == (on_rank, name) else t


# ---- the differ on generated TP engines ------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_ranks_of_a_clean_run_diff_clean(tmp_path, whole, dense, layout, world):
    result = diff(cut(whole, tmp_path, layout, world), dense)
    assert result.first_divergence is None, result.verdict
    assert result.compared == len(result.taps)


@pytest.mark.parametrize(
    "world,rank,tap,words",
    [
        (2, 1, "layers.1.k_proj", "kv head 1"),
        (2, 0, "layers.0.q_rope", "heads 0..1"),
        (4, 3, "layers.2.attn_out", "head 3"),
        (4, 2, "layers.1.mlp.up", "channels 80..119"),
    ],
)
def test_a_slice_wrong_on_one_rank_is_named_with_its_rank_and_slice(tmp_path, whole, dense, world, rank, tap, words):
    result = diff(cut(whole, tmp_path, "megatron", world, scaled(rank, tap)), dense)
    d = result.first_divergence
    assert (d.step, d.tap) == (0, tap)
    assert f"confined to rank {rank}'s slice ({words})" in d.reason
    assert f"rank {rank}'s slice ({words})" in result.verdict
    first = next(t for t in result.taps if t.name == tap)
    assert first.extra["ranks"]["rank"] == [rank] and first.extra["ranks"]["slice"] == words


def test_a_divergence_in_every_rank_s_slice_names_no_rank(tmp_path, whole, dense):
    both = lambda rank, n, t: t * 1.5 if n == "layers.1.q_proj" else t  # noqa: E731
    d = diff(cut(whole, tmp_path, "megatron", 2, both), dense).first_divergence
    assert d.tap == "layers.1.q_proj" and "rank" not in d.reason


def test_a_replicated_copy_that_differs_on_one_rank_names_that_rank(tmp_path, whole, dense):
    d = diff(cut(whole, tmp_path, "megatron", 2, scaled(1, "layers.1.mlp_norm")), dense).first_divergence
    assert d.tap == "layers.1.mlp_norm"
    assert "copies differ: rank 1's leaves the noise floor" in d.reason and "rank 0's is within it" in d.reason


def test_a_copy_of_a_shared_kv_head_that_differs_names_its_rank(tmp_path, whole, dense):
    """4 ranks, 2 kv heads: ranks 2 and 3 both hold kv head 1; rank 3's copy is wrong."""
    d = diff(cut(whole, tmp_path, "megatron", 4, scaled(3, "layers.0.v_proj")), dense).first_divergence
    assert d.tap == "layers.0.v_proj"
    assert "copies of kv head 1 differ: rank 3's leaves the noise floor" in d.reason


def test_copies_that_differ_within_the_noise_are_noted_not_divergent(tmp_path, whole, dense):
    ulp = lambda rank, n, t: torch.nextafter(t, torch.full_like(t, torch.inf)) if (rank, n) == (1, "embed") else t  # noqa: E731
    result = diff(cut(whole, tmp_path, "heads", 2, ulp), dense)
    assert result.first_divergence is None, result.verdict
    assert next(t for t in result.taps if t.name == "embed").extra["ranks"]["copies_differ"] == [0, 1]


@pytest.mark.parametrize("world,rank,factor,times", [(2, 1, 0.5, "0.5x"), (4, 2, 2.0, "2x")])
def test_a_partial_sum_scaled_on_one_rank_is_named_a_partial_sum_fault(
    tmp_path, whole, dense, world, rank, factor, times
):
    dirs = cut(whole, tmp_path, "megatron", world, scaled(rank, "layers.0.o_proj", factor))
    d = diff(dirs, dense).first_divergence
    assert d.tap == "layers.0.o_proj"
    assert f"the sum of the {world} ranks' partial sums is off" in d.reason
    assert f"rank {rank}'s partial" in d.reason and f"as if that partial were {times} what the sum needs" in d.reason


@pytest.fixture(scope="module")
def whole_bf16(dense, tmp_path_factory) -> Path:
    """A bfloat16 capture of scratch: its o_proj inputs carry bf16's own error, as a real TP engine's do."""
    out = tmp_path_factory.mktemp("whole_bf16") / "store"
    return capture(Qwen3Reference(dense, "bfloat16"), forced_steps(PROMPT, DECODE), out)


@pytest.mark.parametrize("factor", [1.05, 0.9, 0.5, 2.0])
def test_a_partial_scaled_a_little_in_bf16_is_still_blamed_on_its_rank(tmp_path, whole_bf16, dense, factor):
    """The inherited bf16 error does not line up with any addend, so the scaled partial's share of the error
    falls short of any fixed cosine as the factor nears 1; taken out, it leaves the sum within the noise."""
    dirs = cut(whole_bf16, tmp_path, "megatron", 2, scaled(1, "layers.0.o_proj", factor))
    d = diff(dirs, dense).first_divergence
    assert d.tap == "layers.0.o_proj" and "rank 1's partial" in d.reason, d.reason
    assert 1 / (1 - d.ranks["factor"]) == pytest.approx(factor, rel=0.02)  # the error is (f - 1) / f x f * addend


def test_a_partial_wrong_in_a_way_no_factor_mends_names_no_rank(tmp_path, whole_bf16, dense):
    g = torch.Generator().manual_seed(1)

    def noisy(rank, n, t):
        if (rank, n) != (1, "layers.0.o_proj"):
            return t
        return t + (t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)

    d = diff(cut(whole_bf16, tmp_path, "megatron", 2, noisy), dense).first_divergence
    assert d.tap == "layers.0.o_proj" and "partial sums is off" in d.reason
    assert "rank" not in d.reason.split("partial sums is off")[1], d.reason


def test_a_moe_whose_ranks_each_add_their_experts_diffs_clean(tmp_path, moe_whole, models):
    """Expert parallelism as the format holds it: each rank's MoE output is its experts' partial sum."""
    result = diff(cut(moe_whole, tmp_path, "megatron", 2), models("tiny-moe"))
    assert result.first_divergence is None, result.verdict


def test_a_moe_partial_scaled_on_one_rank_names_that_rank(tmp_path, moe_whole, models):
    """The shared-expert-scaled-by-1/TP bug of vLLM, SGLang and TensorRT-LLM, on one rank's addend."""
    dirs = cut(moe_whole, tmp_path, "megatron", 2, scaled(1, "layers.1.mlp.out", 0.5))
    d = diff(dirs, models("tiny-moe")).first_divergence
    assert d.tap == "layers.1.mlp.out" and "rank 1's partial" in d.reason


def test_expert_ids_that_differ_between_ranks_name_the_rank(tmp_path, moe_whole, models):
    def other_expert(rank, n, t):
        return (t + 1) % 8 if (rank, n) == (1, "layers.0.moe.topk_ids") else t

    d = diff(cut(moe_whole, tmp_path, "megatron", 2, other_expert), models("tiny-moe")).first_divergence
    assert d.tap == "layers.0.moe.topk_ids" and "rank 1's copy differs from rank 0's" in d.reason


def test_a_lone_rank_store_is_refused_naming_the_grammar(tmp_path, whole, dense):
    dirs = cut(whole, tmp_path, "heads", 2)
    with pytest.raises(UserError, match=r"rank 0 of a 2-rank run: name every rank's store, store:DIR0,DIR1"):
        run_diff("hf", f"store:{dirs[0]}", model_dir=dense)


def test_the_ranks_of_a_run_serve_as_the_reference_too(tmp_path, whole, dense):
    ref = "store:" + ",".join(map(str, cut(whole, tmp_path, "megatron", 2)))
    assert run_diff(ref, "scratch", model_dir=dense).first_divergence is None


def test_a_one_rank_run_diffs_as_a_store(tmp_path, whole, dense):
    assert diff(cut(whole, tmp_path, "megatron", 1), dense).first_divergence is None


def test_the_cli_diff_exits_1_on_a_one_rank_bug_and_names_the_rank(tmp_path, whole, dense):
    dirs = cut(whole, tmp_path, "megatron", 2, scaled(1, "layers.0.k_proj"))
    out = tmp_path / "d.json"
    assert cli("diff", "--cand", "store:" + ",".join(map(str, dirs)), "--model", dense, "--json", out) == 1
    first = json.loads(out.read_text())["first_divergence"]
    assert "confined to rank 1's slice (kv head 1)" in first["reason"]
    assert first["ranks"] == {
        "kind": "split",
        "world_size": 2,
        "rank": [1],
        "slice": "kv head 1",
        "axis": 2,
        "start": 32,
        "stop": 64,
    }


# ---- validate-store on rank stores -------------------------------------------------------------------


def _manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def ranks(whole, tmp_path_factory) -> list[Path]:
    return cut(whole, tmp_path_factory.mktemp("ranks"), "megatron", 2)


def test_rank_stores_are_valid_alone_and_together(ranks, dense):
    cfg = load_config(dense)
    assert validate_store(ranks[0], cfg) == [] and validate_store(ranks[1], cfg) == []
    assert validate_ranks(ranks, cfg) == []
    assert cli("validate-store", *ranks, "--model", dense) == 0


def test_a_store_without_rank_fields_reads_as_before(whole):
    assert TapStore.open(whole).rank is None and "rank" not in json.loads((whole / "manifest.json").read_text())


def test_the_layout_round_trips_through_the_manifest(ranks):
    info = TapStore.open(ranks[1]).rank
    assert (info.rank, info.world_size) == (1, 2)
    assert info.shard("layers.2.k_proj") == Shard("split", 2, 32, 64)
    assert info.shard("layers.0.o_proj") == Shard("partial") and info.shard("embed") == Shard("replicated")


def _other_dtype(whole: Path, out: Path) -> list[Path]:
    return cut(whole, out, "megatron", 2, lambda rank, n, t: t.half() if (rank, n) == (1, "layers.0.q_proj") else t)


def _rank1_manifest(edit):
    """The pair of rank stores with rank 1's manifest changed by `edit`."""

    def make(a: Path, b: Path, tmp: Path, whole: Path) -> list[Path]:
        _manifest(b, edit)
        return [a, b]

    return make


BAD_SETS = {
    "a missing rank": (lambda a, b, t, w: [a], "rank 1 of 2 is missing"),
    "a duplicate rank": (lambda a, b, t, w: [a, _copy(a, t / "again")], "it is rank 0, and so is"),
    "world sizes that disagree": (_rank1_manifest(lambda m: m.update(world_size=3)), "its world_size is 3 but"),
    "overlapping slices": (
        _rank1_manifest(lambda m: m["shards"].update(q_norm={"axis": 2, "start": 1, "stop": 3})),
        "its slices do not cover it exactly once: ranks 0, 1 hold overlapping slices",
    ),
    "a slice no rank holds": (
        _rank1_manifest(lambda m: m["shards"].update(q_norm={"axis": 2, "start": 3, "stop": 5})),
        "[2, 3) is held by no rank",
    ),
    "layouts that disagree": (
        _rank1_manifest(lambda m: m["shards"].update({"o_proj": "replicated"})),
        "the ranks declare different layouts for it",
    ),
    "other token ids": (
        _rank1_manifest(lambda m: m["steps"][1].update(token_ids=[[43]])),
        "its steps (token ids, positions, cache slots and query rows) differ from",
    ),
    "shards of one tap in two dtypes": (
        lambda a, b, t, w: _other_dtype(w, t / "halved"),
        "its shards have different dtypes (float16, float32)",
    ),
    "a store of a whole run among ranks": (
        _rank1_manifest(lambda m: [m.pop(k) for k in ("rank", "world_size", "shards")]),
        "its manifest names no rank and world_size",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_validate_store_refuses_a_bad_set_of_rank_stores_in_one_sentence(tmp_path, whole, ranks, dense, case):
    make, expected = BAD_SETS[case]
    a, b = _copy(ranks[0], tmp_path / "a"), _copy(ranks[1], tmp_path / "b")
    dirs = make(a, b, tmp_path, whole)
    problems = validate_ranks(dirs, load_config(dense))
    assert problems and any(expected in str(p) for p in problems), problems
    with pytest.raises(UserError, match="is not a valid tap store|rank 0 of a 2-rank run"):
        diff(dirs, dense)


BAD_ALONE = {
    "a rank outside the world": ({"rank": 2}, "rank 2 and world_size 2 must be integers with 0 <= rank < world_size"),
    "a malformed shard": ({"shards": {"q_proj": "halves"}}, "shards['q_proj'] is neither"),
    "an empty slice": ({"shards": {"q_proj": {"axis": 2, "start": 4, "stop": 4}}}, "must satisfy 0 <= start < stop"),
    "a split along the token axis": (
        {"shards": {"attn_norm": {"axis": 1, "start": 0, "stop": 3}}},
        "splits attn_norm along axis 1, which is not one of its axes other than B, T and S",
    ),
    "a shard of no op": ({"shards": {"q_projection": "partial"}}, "neither an op nor a tap of the schema"),
    "a slice past the tap": (
        {"shards": {"q_norm": {"axis": 2, "start": 2, "stop": 6}}},
        "is split up to 6 along axis 2, which has 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ALONE))
def test_validate_store_explains_a_bad_rank_manifest(tmp_path, ranks, dense, case):
    fields, expected = BAD_ALONE[case]
    d = _copy(ranks[1], tmp_path / "r")
    _manifest(d, lambda m: m.update(fields))
    problems = validate_store(d, load_config(dense))
    assert any(expected in str(p) for p in problems), problems


def test_a_directory_that_does_not_exist_among_the_ranks_is_one_sentence(ranks, dense, tmp_path):
    with pytest.raises(UserError, match=r"is not a directory holding a tap store"):
        run_diff("hf", f"store:{ranks[0]},{tmp_path / 'nowhere'}", model_dir=dense)


# ---- the pure functions ------------------------------------------------------------------------------


def test_gather_concatenates_slices_in_order_of_their_start_whatever_the_rank_order():
    t = torch.arange(24.0).view(1, 2, 12)
    parts = [Part(1, Shard("split", 2, 6, 12), t[..., 6:]), Part(0, Shard("split", 2, 0, 6), t[..., :6])]
    assert torch.equal(gather(parts), t)


def test_gather_takes_one_copy_of_a_slice_several_ranks_hold():
    t = torch.randn(1, 2, 4, 8)
    parts = [
        Part(r, Shard("split", 2, 2 * (r // 2), 2 * (r // 2) + 2), t[:, :, 2 * (r // 2) : 2 * (r // 2) + 2])
        for r in range(4)
    ]
    assert torch.equal(gather(parts), t)


def test_gather_sums_bf16_partials_once_rounded():
    a = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([2**-8, 2**-9], dtype=torch.bfloat16)  # 1 + 2^-8 is a bf16 tie, rounded to even once
    total = gather([Part(0, Shard("partial"), a), Part(1, Shard("partial"), b), Part(2, Shard("partial"), b)])
    assert total.dtype == torch.bfloat16
    assert total.tolist() == (a.float() + 2 * b.float()).bfloat16().tolist()


@pytest.mark.parametrize(
    "slices,size,expected",
    [
        ([(0, 0, 4), (1, 4, 8)], 8, None),
        ([(0, 0, 4), (1, 0, 4), (2, 4, 8), (3, 4, 8)], 8, None),
        ([(0, 0, 5), (1, 4, 8)], 8, "ranks 0, 1 hold overlapping slices"),
        ([(0, 0, 4), (1, 5, 8)], 8, "[4, 5) is held by no rank"),
        ([(0, 0, 4), (1, 4, 6)], 8, "[6, 8) is held by no rank"),
        ([(0, 0, 4), (1, 4, 10)], 8, "the slices reach 10, past 8"),
        ([(0, 2, 4), (1, 4, 8)], None, "[0, 2) is held by no rank"),
    ],
)
def test_coverage_problem_finds_each_way_slices_miss_exactly_once(slices, size, expected):
    found = coverage_problem(slices, size)
    assert found == expected if expected is None else expected in found


@pytest.mark.parametrize(
    "axis,start,stop,words",
    [
        ("nH*D", 64, 128, "heads 2..3"),
        ("nKV*D", 32, 64, "kv head 1"),
        ("nH", 1, 2, "head 1"),
        ("I", 80, 160, "channels 80..159"),
        ("nH*D", 16, 48, "channels 16..47 (not whole heads of 32)"),
    ],
)
def test_slice_words_speak_in_heads_where_the_axis_is_heads(axis, start, stop, words):
    assert slice_words(axis, start, stop, 32) == words


def test_partial_fits_give_each_rank_the_least_squares_factor_of_its_addend():
    g = torch.Generator().manual_seed(0)
    p = [Part(r, Shard("partial"), torch.randn(4096, generator=g)) for r in range(3)]
    fits = {rank: (a, cos) for rank, a, cos in partial_fits(-0.5 * p[2].value, p)}
    assert fits[2] == (pytest.approx(-0.5), pytest.approx(-1.0))
    assert all(abs(cos) < 0.1 for rank, (_, cos) in fits.items() if rank != 2)  # unrelated addends line up with none
