"""Checking a tap store against the store rules and the tap schema before anything compares it.

`validate_store` is what `qwen3dbg validate-store` prints and what `diff` runs on a `store:` candidate:
a store written by another program (the C header, a port's own dumper) is explained problem by
problem instead of failing somewhere inside a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from qwen3dbg.model.config import Qwen3Config, parse_config
from qwen3dbg.scan.container import read_safetensors
from qwen3dbg.tapstore.store import RankInfo, read_manifest, step_file
from qwen3dbg.tapstore.schema import (
    HEAD_OPS,
    LAYER_OPS,
    OPS_BY_NAME,
    TAIL_OPS,
    iter_step_taps,
    parse_tap_name,
    select,
    tap_name,
    tap_spec,
)
from qwen3dbg.util.dtypes import dtype_name, parse_dtype, ulp
from qwen3dbg.util.errors import UserError

FLOAT_STORE_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: what a manifest's dtype may say: torch's names and the aliases docs/taps.md allows readers to accept
FLOAT_DTYPE_NAMES = (*FLOAT_STORE_DTYPES, "fp32", "bf16", "fp16", "fp64")
INTEGER_TAP_DTYPES = ("int32", "int64")
#: validation stops after this many problems (a manifest of a million broken steps is not listed in full)
MAX_PROBLEMS = 1000
#: taps lacking from one step counted at most (a config may declare any number of layers)
MAX_LACKING = 1000
#: without a vocabulary to check against, token ids must still index one: no tokenizer has 2**31 ids
MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: where (manifest, a step, a tap) and what, in a sentence."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def validate_store(path: str | Path, config: Qwen3Config | None = None) -> list[Problem]:
    """Every problem of the store at `path`; [] when it is valid. Shapes are checked against `config`,
    or against the config the manifest carries when none is given. Raises UserError if unreadable."""
    path = Path(path)
    m = read_manifest(path)
    return _collect(lambda bad: _validate(path, m, config, bad))


def validate_ranks(paths: list[str | Path], config: Qwen3Config | None = None) -> list[Problem]:
    """Every problem of the stores of the ranks of one tensor-parallel run, each alone (its rank's slices
    shaped as its manifest says) and together: one store per rank 0..N-1 of one world size, the same model,
    dtype, ids and declared taps, the same layout of each tap on every rank, splits covering the tap exactly
    once, and each tap in one dtype on every rank. Raises UserError if a store is unreadable."""
    paths = [Path(p) for p in paths]
    manifests = [read_manifest(p) for p in paths]

    def check(bad) -> None:
        for path, m in zip(paths, manifests):
            _validate(path, m, config, lambda where, message: bad(f"{path}, {where}", message))
        _validate_together(paths, manifests, config, bad)

    return _collect(check)


def _collect(check) -> list[Problem]:
    problems: list[Problem] = []

    def bad(where: str, message: str) -> None:
        problems.append(Problem(where, message))
        if len(problems) == MAX_PROBLEMS:
            raise _Enough

    try:
        check(bad)
    except _Enough:
        problems.append(Problem("store", f"validation stopped after {MAX_PROBLEMS} problems"))
    return problems


class _Enough(Exception):
    """Raised by the problem collector when MAX_PROBLEMS are found."""


def _validate(path: Path, m: dict, config: Qwen3Config | None, bad) -> None:
    if m.get("complete") is not True:
        bad("manifest", "it is incomplete (complete is not true): the writer stopped mid-run; capture it again")
    if m.get("dtype") not in FLOAT_DTYPE_NAMES:
        bad("manifest", f"dtype {m.get('dtype')!r} is not one of {', '.join(FLOAT_STORE_DTYPES)}")
    batch = m.get("batch")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        bad("manifest", f"batch {batch!r} is not a positive integer")
        batch = None
    missing = m.get("missing_taps", [])
    if not isinstance(missing, list) or not all(isinstance(x, str) for x in missing):
        bad("manifest", "missing_taps is not a list of op names")
        missing = []
    kept = m.get("taps")
    if kept is not None and not (isinstance(kept, list) and kept and all(isinstance(x, str) for x in kept)):
        bad("manifest", "taps is not a list of globs of tap names (what a capture with --taps kept)")
        kept = None
    for name in missing:
        if name not in OPS_BY_NAME:
            bad(
                "manifest", f"missing_taps names {name!r}, which is no op of the schema (it lists ops: attn_probs, ...)"
            )
    config = _config(m, config, bad)
    try:
        rank = RankInfo.parse(m)
    except ValueError as e:
        bad("manifest", f"its {e}")
        rank = None
    if rank is not None:
        _check_shards(rank, bad)
    dtype = parse_dtype(m["dtype"]) if m.get("dtype") in FLOAT_DTYPE_NAMES else None
    steps = m.get("steps")
    if not isinstance(steps, list) or not steps:
        bad("manifest", "steps is empty or not a list: the store holds no forward step")
        return

    cache = 0
    for index, entry in enumerate(steps):
        where = f"step {index}"
        tokens = _step_tokens(entry, index, batch, cache, config, bad, where)
        if tokens is None:
            return  # positions and cache lengths of later steps cannot be trusted
        cache += tokens
        if isinstance(entry.get("missing"), list) and entry["missing"]:
            bad(where, f"the writer planned {len(entry['missing'])} taps it never wrote, e.g. {entry['missing'][0]}")
        subsets = _subsets(entry, cache, bad, where)
        _check_step_file(
            path, index, entry["token_ids"], cache, config, dtype, set(missing), kept, subsets, rank, bad, where
        )


def _config(m: dict, given: Qwen3Config | None, bad) -> Qwen3Config | None:
    raw = m.get("config")
    if raw is None:
        return given
    if not isinstance(raw, dict):
        bad("manifest", f"its config is a JSON {type(raw).__name__}, not an object like config.json")
        return given
    try:
        carried = parse_config(raw)
    except UserError as e:
        bad("manifest", f"its config is not a Qwen3 config ({e})")
        return given
    if given is None:
        return carried
    for f in carried.shape_mismatches(given):
        bad(
            "manifest",
            f"its config has {f} {getattr(carried, f)} but --model has {getattr(given, f)}: "
            "the store was written for another model",
        )
    return given


def _int_rows(rows) -> bool:
    return (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in rows)
    )


def _step_tokens(entry, index: int, batch, cache: int, config, bad, where: str) -> int | None:
    """Check a step entry's numbering, token ids [B][T] and positions [B][T]; return T or None."""
    if not isinstance(entry, dict):
        bad(where, "the entry is not an object")
        return None
    if entry.get("step") != index:
        bad(where, f"is numbered {entry.get('step')!r}: steps must be numbered 0, 1, 2, ... in order")
    ids, pos = entry.get("token_ids"), entry.get("positions")
    if not _int_rows(ids) or not _int_rows(pos):
        bad(where, "token_ids and positions must both be [B][T] lists of integers")
        return None
    tokens = len(ids[0])
    if tokens == 0 or any(len(r) != tokens for r in ids) or [len(r) for r in pos] != [len(r) for r in ids]:
        bad(where, "token_ids and positions must be rectangular [B][T] with the same shape and T > 0")
        return None
    if batch is not None and len(ids) != batch:
        bad(where, f"token_ids has {len(ids)} rows but the manifest's batch is {batch}")
    if index > 0 and tokens != 1:
        bad(where, f"a decode step has {tokens} tokens; after the prefill each step decodes one token")
    expected = list(range(cache, cache + tokens))
    if any(r != expected for r in pos):
        bad(where, f"positions {pos[0]} should be {expected}: they continue the cache without gaps")
    _check_ids(ids, config.vocab_size if config is not None else None, "the vocabulary", bad, where)
    return tokens


def _subsets(entry: dict, cache: int, bad, where: str) -> dict[str, int]:
    """The sizes of the S axis of the cache taps and the T axis of the attention taps where the step declares
    that it holds only some slots or rows (docs/taps.md): op -> size."""
    sizes = {}
    positions = entry["positions"][0]
    for key, ops, allowed, what in (
        ("cache_positions", ("k_cache", "v_cache"), range(cache), "cache slots"),
        ("attention_positions", ("attn_scores", "attn_probs"), positions, "query rows"),
    ):
        declared = entry.get(key)
        if declared is None:
            continue
        if (
            not isinstance(declared, list)
            or not declared
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in declared)
        ):
            bad(where, f"{key} must be a non-empty list of integer positions")
            continue
        outside = [p for p in declared if p not in allowed]
        if outside:
            bad(
                where,
                f"{key} {outside[:5]} are not {what} of this step (allowed: {allowed.start}..{allowed.stop - 1})"
                if isinstance(allowed, range)
                else f"{key} {outside[:5]} are not {what} of this step (its positions: {positions[:5]}...)",
            )
        if len(set(declared)) != len(declared):
            bad(where, f"{key} repeats a position: each {what[:-1]} is written once")
        if key == "cache_positions" and declared != positions and declared != list(range(cache)):
            bad(
                where,
                f"cache_positions {declared[:5]} are neither the step's own positions {positions[:5]} nor the "
                "whole cache: a step holds the slots it wrote, or all of them",
            )
        sizes.update({op: len(declared) for op in ops})
    return sizes


def _check_ids(ids: list[list[int]], vocab: int | None, what: str, bad, where: str) -> None:
    """Token ids must index the vocabulary; without one known, at least be ids (0 <= id <= MAX_TOKEN_ID)."""
    top = vocab if vocab is not None else MAX_TOKEN_ID + 1
    out = sorted({i for r in ids for i in r if not 0 <= i < top})
    if out:
        bad(where, f"token ids {out[:5]} are outside {what} [0, {top})")


def _check_step_file(
    path: Path,
    step: int,
    ids: list[list[int]],
    cache: int,
    config,
    dtype,
    declared: set[str],
    kept: list[str] | None,
    subsets: dict[str, int],
    rank: RankInfo | None,
    bad,
    where: str,
) -> None:
    """The taps of one step file: names, dtypes and shapes against the schema (and `config`, with the
    declared `subsets` of cache slots and query rows, and the slice a `rank` holds of a split tap), and
    every tap of the schema present, its op in missing_taps (`declared`), or left out by a selection (`kept`); no
    float tap less precise than the manifest's `dtype`."""
    f = path / step_file(step)
    if not f.is_file():
        bad(where, f"{f.name} is missing")
        return
    batch, tokens = len(ids), len(ids[0])
    entries, damage = read_safetensors(f)
    for finding in damage:  # truncation, a bad header, overlapping or missing bytes
        bad(where, finding.message)
    present, coarser = set(), []
    for entry in entries:
        name, file_dtype, shape = entry.name, entry.dtype, list(entry.shape)
        layer, op = parse_tap_name(name)
        spec = OPS_BY_NAME.get(op)
        expected = tap_spec(config, name, batch, tokens, cache) if config is not None and spec else None
        tw = f"{where}, {name}"
        if (
            spec is None
            or (config is not None and expected is None)
            or (layer is not None and name != tap_name(op, layer))
        ):
            why = (
                "no op of the schema"
                if spec is None
                else "not a tap of this model (its layer count or dense/MoE kind differ)"
            )
            bad(tw, f"is {why}; docs/taps.md lists the names")
            continue
        present.add(name)
        if spec.integer:
            if file_dtype not in INTEGER_TAP_DTYPES:
                bad(tw, f"has dtype {file_dtype}; expert ids are int64 or int32")
        elif file_dtype not in FLOAT_STORE_DTYPES:
            bad(
                tw,
                f"has dtype {file_dtype}; a float tap is stored in the float dtype it was computed in "
                f"({', '.join(FLOAT_STORE_DTYPES)})",
            )
        elif dtype is not None and ulp(parse_dtype(file_dtype)) > ulp(dtype):
            # A tap may be kept in a more precise float dtype than the store's (fp32 attention probabilities
            # in a bf16 engine): it is compared as stored, with the tolerances of the manifest's dtype. A less
            # precise one would be judged by tolerances its own rounding exceeds: a divergence no bug made.
            coarser.append(entry)
        if expected is not None:
            want = list(expected.shape)
            if op in subsets:  # a declared subset of the cache's slots or of the attention's query rows
                want[2] = subsets[op]
            shard = rank.shard(name) if rank is not None else None
            if shard is not None and shard.kind == "split" and shard.axis < len(want):
                if shard.stop > want[shard.axis]:
                    bad(tw, f"is split up to {shard.stop} along axis {shard.axis}, which has {want[shard.axis]}")
                want[shard.axis] = shard.stop - shard.start
            if shape != want:
                bad(tw, f"has shape {shape}, expected {want} [{','.join(spec.axes)}]")
        elif len(shape) != len(spec.axes) or shape[:1] != [batch]:
            bad(tw, f"has shape {shape}, expected {len(spec.axes)} axes [{','.join(spec.axes)}] with B = {batch}")
        elif op == "logits":  # no config: the logits' last axis is the vocabulary
            _check_ids(ids, shape[-1], "the logits' vocabulary", bad, where)
    if coarser:
        held = sorted({e.dtype for e in coarser})
        bad(
            where,
            f"{len(coarser)} float taps are stored in {' and '.join(held)} (e.g. {coarser[0].name}), less precise "
            f"than the manifest's dtype {dtype_name(dtype)}: judged by {dtype_name(dtype)}'s tolerances their own "
            f"rounding would read as a divergence; a store computed in {held[0]} says dtype {held[0]!r}",
        )
    wanted = (
        n
        for n in _schema_names(config, present, batch, tokens, cache)
        if parse_tap_name(n)[1] not in declared and select([n], kept)
    )
    lacking = list(islice((n for n in wanted if n not in present), MAX_LACKING))
    if lacking:
        count = f"{len(lacking)}" if len(lacking) < MAX_LACKING else f"at least {MAX_LACKING}"
        bad(
            where,
            f"lacks {count} taps that are neither in {f.name} nor declared in missing_taps, e.g. "
            f"{', '.join(lacking[:3])}: write them, or list their ops in the manifest's missing_taps",
        )


def _schema_names(config: Qwen3Config | None, present: set[str], batch: int, tokens: int, cache: int):
    """The tap names a step must hold, lazily: the model's, or without a config those outside the layers and
    the taps every layer has (dense or MoE alike), for each layer up to the last one the file holds."""
    if config is not None:
        yield from (t.name for t in iter_step_taps(config, batch, tokens, cache))
        return
    layers = max((layer for layer, _ in map(parse_tap_name, present) if layer is not None), default=-1) + 1
    yield from (o.op for o in HEAD_OPS)
    for layer in range(layers):
        yield from (tap_name(o.op, layer) for o in LAYER_OPS if o.where == "all")
    yield from (o.op for o in TAIL_OPS)


#: axes a tap is never split along: the batch, and the token and cache axes whose subsets a step declares
UNSPLIT_AXES = ("B", "T", "S")


def _check_shards(rank: RankInfo, bad) -> None:
    """Each entry of a rank store's `shards`: an op or tap of the schema, split along an axis it has."""
    for key, shard in rank.shards.items():
        layer, op = parse_tap_name(key)
        spec = OPS_BY_NAME.get(op)
        if spec is None or (layer is not None and key != tap_name(op, layer)):
            bad("manifest", f"shards names {key!r}, which is neither an op nor a tap of the schema")
            continue
        if spec.integer and shard.kind == "partial":
            bad("manifest", f"shards declares {key} a partial sum, but its expert ids are not summed")
        if shard.kind == "split" and not (
            0 <= shard.axis < len(spec.axes) and spec.axes[shard.axis] not in UNSPLIT_AXES
        ):
            bad(
                "manifest",
                f"shards splits {key} along axis {shard.axis}, which is not one of its axes other than "
                f"B, T and S [{','.join(spec.axes)}]",
            )


def _validate_together(paths: list[Path], manifests: list[dict], config: Qwen3Config | None, bad) -> None:
    """What the ranks' stores must agree on (see validate_ranks); each store's own problems are found alone."""
    ranks: dict[int, Path] = {}
    infos: list[RankInfo] = []
    for path, m in zip(paths, manifests):
        try:
            info = RankInfo.parse(m)
        except ValueError:
            return  # said by the store's own validation
        if info is None:
            bad(str(path), "its manifest names no rank and world_size: it is not a store of one rank of a run")
            return
        if info.rank in ranks:
            bad(str(path), f"it is rank {info.rank}, and so is {ranks[info.rank]}: give each rank's store once")
            return
        ranks[info.rank] = path
        infos.append(info)
    first, world = paths[0], infos[0].world_size
    for path, info in zip(paths, infos):
        if info.world_size != world:
            bad(str(path), f"its world_size is {info.world_size} but {first}'s is {world}: give the stores of one run")
            return
    absent = sorted(set(range(world)) - set(ranks))
    if absent:
        bad("ranks", f"rank {', '.join(map(str, absent))} of {world} is missing: give every rank's store")
        return
    for key, what in (
        ("config", "model config"),
        ("dtype", "dtype"),
        ("batch", "batch"),
        ("missing_taps", "missing_taps"),
        ("taps", "selection of taps"),
        ("steps", "steps (token ids, positions, cache slots and query rows)"),
    ):
        for path, m in zip(paths[1:], manifests[1:]):
            if _agreeing(m.get(key), key) != _agreeing(manifests[0].get(key), key):
                bad(str(path), f"its {what} differ from {first}'s: the ranks of one run see the same model and ids")
    if not isinstance(manifests[0].get("steps"), list):
        return
    order = sorted(range(len(paths)), key=lambda i: infos[i].rank)
    for step in range(len(manifests[0]["steps"])):
        headers = [_header(paths[i] / step_file(step)) for i in order]
        if any(h is None for h in headers):
            continue  # a missing or damaged step file: said by that store's own validation
        _check_step_together(step, [infos[i] for i in order], [paths[i] for i in order], headers, config, bad)


def _agreeing(value, key: str):
    """A manifest field as ranks must agree on it (missing_taps in any order)."""
    return sorted(value) if key == "missing_taps" and isinstance(value, list) else value


def _header(path: Path) -> dict[str, tuple[str, list[int]]] | None:
    """name -> (dtype, shape) of a step file's tensors, or None when it cannot be read."""
    if not path.is_file():
        return None
    entries, damage = read_safetensors(path)
    return None if damage else {e.name: (e.dtype, list(e.shape)) for e in entries}


def _check_step_together(step: int, infos: list[RankInfo], paths: list[Path], headers: list[dict], config, bad) -> None:
    """One step's files of every rank (ordered by rank): the same taps, each in one dtype, laid out alike,
    and the slices of a split tap covering it exactly once."""
    where = f"step {step}"
    names = headers[0].keys()
    for info, path, h in zip(infos[1:], paths[1:], headers[1:]):
        if h.keys() != names:
            odd = sorted(h.keys() ^ names)[0]
            bad(where, f"rank {info.rank} ({path}) and rank 0 do not hold the same taps, e.g. {odd}")
    for name in names:
        held = [(info, h[name]) for info, h in zip(infos, headers) if name in h]
        dtypes = {dtype for _, (dtype, _) in held}
        if len(dtypes) > 1:
            bad(f"{where}, {name}", f"its shards have different dtypes ({', '.join(sorted(dtypes))}): write one dtype")
        shards = [info.shard(name) for info, _ in held]
        kinds = {(sh.kind, sh.axis) for sh in shards}
        if len(kinds) > 1:
            bad(f"{where}, {name}", "the ranks declare different layouts for it: every rank lays a tap out alike")
            continue
        shapes = [list(shape) for _, (_, shape) in held]
        shard = shards[0]
        if shard.kind == "split":
            for s in shapes:
                if shard.axis < len(s):
                    s[shard.axis] = None
        if any(s != shapes[0] for s in shapes):
            bad(f"{where}, {name}", "its shards have different shapes off the split axis: the ranks hold one tensor")
            continue
        if shard.kind == "split" and step == 0:
            spec = tap_spec(config, name, 1, 1, 1) if config is not None else None
            size = None
            if spec is not None and shard.axis < len(spec.shape):
                size = spec.shape[shard.axis]
            problem = coverage_problem([(info.rank, sh.start, sh.stop) for (info, _), sh in zip(held, shards)], size)
            if problem:
                bad(f"{where}, {name}", f"its slices do not cover it exactly once: {problem}")


def coverage_problem(slices: list[tuple[int, int, int]], size: int | None) -> str | None:
    """What is wrong with how ranks' slices (rank, start, stop) of one axis cover it, in words, or None when
    they cover [0, size) exactly once (ranks with identical slices hold copies of one slice). Without a
    known `size`, the slices must cover [0, their largest stop)."""
    distinct = sorted({(start, stop) for _, start, stop in slices})
    end = size if size is not None else distinct[-1][1]
    reach = 0
    for start, stop in distinct:
        if start < reach:
            holders = sorted(r for r, a, b in slices if a < stop and start < b)
            return f"ranks {', '.join(map(str, holders))} hold overlapping slices ending at {reach} and {stop}"
        if start > reach:
            return f"[{reach}, {start}) is held by no rank"
        reach = stop
    if reach != end:
        return f"[{reach}, {end}) is held by no rank" if reach < end else f"the slices reach {reach}, past {end}"
    return None
