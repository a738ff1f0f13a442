"""Checking a tap store against the store rules and the tap schema before anything compares it.

`validate_store` is what `qwen3dbg validate-store` prints and what `diff` runs on a `store:` candidate:
a store written by another program (the C header, a port's own dumper) is explained problem by
problem instead of failing somewhere inside a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from qwen3dbg.config import Qwen3Config, parse_config
from qwen3dbg.errors import UserError
from qwen3dbg.scan.container import read_safetensors
from qwen3dbg.store import read_manifest, step_file
from qwen3dbg.taps import (
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
    problems: list[Problem] = []

    def bad(where: str, message: str) -> None:
        problems.append(Problem(where, message))
        if len(problems) == MAX_PROBLEMS:
            raise _Enough

    try:
        _validate(path, m, config, bad)
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
        _check_step_file(path, index, entry["token_ids"], cache, config, set(missing), kept, subsets, bad, where)


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


def _subsets(entry: dict, cache: int, bad, where: str) -> dict[str, tuple[int, int]]:
    """Where the step declares that it holds only some slots or rows (docs/taps.md): op -> (axis, size), the
    S axis of the cache taps, the T axis of the attention taps and of the logits."""
    sizes = {}
    positions = entry["positions"][0]
    for key, ops, axis, allowed, what in (
        ("cache_positions", ("k_cache", "v_cache"), 2, range(cache), "cache slots"),
        ("attention_positions", ("attn_scores", "attn_probs"), 2, positions, "query rows"),
        ("logits_positions", ("logits",), 1, positions, "token rows"),
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
        sizes.update({op: (axis, len(declared)) for op in ops})
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
    declared: set[str],
    kept: list[str] | None,
    subsets: dict[str, tuple[int, int]],
    bad,
    where: str,
) -> None:
    """The taps of one step file: names, dtypes and shapes against the schema (and `config`, with the
    declared `subsets` of cache slots and query rows), and every tap of the schema present, its op in
    missing_taps (`declared`), or left out by a selection (`kept`)."""
    f = path / step_file(step)
    if not f.is_file():
        bad(where, f"{f.name} is missing")
        return
    batch, tokens = len(ids), len(ids[0])
    entries, damage = read_safetensors(f)
    for finding in damage:  # truncation, a bad header, overlapping or missing bytes
        bad(where, finding.message)
    present = set()
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
            # A tap may be kept in another float dtype than the store's (fp32 attention probabilities in a
            # bf16 engine): it is compared as stored, with the tolerances of the manifest's dtype.
            bad(
                tw,
                f"has dtype {file_dtype}; a float tap is stored in the float dtype it was computed in "
                f"({', '.join(FLOAT_STORE_DTYPES)})",
            )
        if expected is not None:
            want = list(expected.shape)
            if op in subsets:  # a declared subset of the cache's slots, the attention's or the logits' rows
                axis, size = subsets[op]
                want[axis] = size
            if shape != want:
                bad(tw, f"has shape {shape}, expected {want} [{','.join(spec.axes)}]")
        elif len(shape) != len(spec.axes) or shape[:1] != [batch]:
            bad(tw, f"has shape {shape}, expected {len(spec.axes)} axes [{','.join(spec.axes)}] with B = {batch}")
        elif op == "logits":  # no config: the logits' last axis is the vocabulary
            _check_ids(ids, shape[-1], "the logits' vocabulary", bad, where)
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
