"""What `--ref` and `--cand` name: an implementation to run (`hf`, `hf:attn=sdpa`, a catalogue bug) or
`store:DIR`, a tap store already on disk whose token ids every other side is then run on, or
`store:DIR0,DIR1,...`, the stores of the ranks of one tensor-parallel run, gathered tap by tap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3dbg.config import Qwen3Config
from qwen3dbg.errors import UserError
from qwen3dbg.store import StepInfo, TapStore
from qwen3dbg.validate import validate_ranks, validate_store

if TYPE_CHECKING:
    from qwen3dbg.diff.shards import RankStores

STORE_PREFIX = "store:"


@dataclass(frozen=True)
class SideSpec:
    text: str
    name: str | None = None  # implementation name, None for a store
    options: dict = field(default_factory=dict)
    store: "TapStore | RankStores | None" = None


def parse_side(text: str, role: str, config: Qwen3Config | None = None) -> SideSpec:
    """`hf` | `hf:attn=sdpa,k=v` | `store:DIR` -> SideSpec; a store is validated (against `config`, the
    model of the diff: its taps' shapes, its token ids) and opened now.
    Only a registered name takes `:key=value` options; any other text (`module:port.py:load`) is passed
    whole to the registry as the name."""
    from qwen3dbg.registry import IMPLEMENTATIONS

    text = text.strip()
    if text.startswith(STORE_PREFIX):
        return SideSpec(text, store=_open_stores(text, role, config))
    name, _, opts = text.partition(":")
    if name not in IMPLEMENTATIONS:
        return SideSpec(text, name=text)
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--{role} {text}: options are written NAME:key=value,key=value, e.g. hf:attn=sdpa")
        options[key] = value
    if not name:
        raise UserError(f"--{role} is empty: name an implementation (hf, scratch, ...) or store:DIR")
    return SideSpec(text, name=name, options=options)


def _open_stores(text: str, role: str, config: Qwen3Config | None) -> "TapStore | RankStores":
    """`store:DIR`, or `store:DIR0,DIR1,...` (a directory whose own name holds a comma is one store), validated
    and opened; a store written by one rank of several is refused alone."""
    from qwen3dbg.diff.shards import RankStores

    given = text[len(STORE_PREFIX) :]
    paths = [Path(given)] if Path(given).is_dir() else [Path(p) for p in given.split(",")]
    for path in paths:
        if not path.is_dir():
            raise UserError(f"--{role} {text}: {path} is not a directory holding a tap store")
    problems = validate_store(paths[0], config) if len(paths) == 1 else validate_ranks(paths, config)
    if problems:
        shown = " ".join(str(p) for p in paths)
        raise UserError(
            f"--{role} {text} is not a valid tap store, {problems[0]}"
            f"{f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''}: "
            f"see `qwen3dbg validate-store {shown}`"
        )
    if len(paths) > 1:
        return RankStores.open(paths)
    store = TapStore.open(paths[0])
    if store.rank is None:
        return store
    if store.rank.world_size > 1:
        raise UserError(
            f"--{role} {text} holds rank {store.rank.rank} of a {store.rank.world_size}-rank run: name every "
            f'rank\'s store, store:DIR0,DIR1,... (docs/taps.md, "Tensor-parallel runs")'
        )
    return RankStores([store])


def check_sides(specs: list[SideSpec], model_dir: Path, dtype) -> None:
    """Refuse any side that could not run, before any side does (`capture` and `diff` call this first):
    a name that does not resolve, an option it does not take, a port that does not import, a missing
    extra, a dtype that does not exist. Stores were checked when parsed. No weights are loaded."""
    from qwen3dbg.dtypes import parse_dtype
    from qwen3dbg.registry import check_candidate

    dtype = parse_dtype(dtype)
    for spec in specs:
        if spec.store is None:
            check_candidate(spec.name, model_dir, dtype, **spec.options)


def store_steps(specs: list[SideSpec], given: list[StepInfo] | None) -> list[StepInfo] | None:
    """The steps fixed by the stores among the sides (None when no side is a store); all must agree."""
    stores = [s for s in specs if s.store is not None]
    if not stores:
        return None
    steps = stores[0].store.steps
    for s in stores:
        if _ids(s.store.steps) != _ids(steps):
            raise UserError(
                f"{s.text} and {stores[0].text} were captured on different token ids: capture both on the same ids"
            )
        if len(s.store.steps[0].token_ids) != 1:
            raise UserError(f"{s.text} holds a batch of {len(s.store.steps[0].token_ids)}: the differ compares batch 1")
    if given is not None and _ids(given) != _ids(steps):
        raise UserError(
            f"{stores[0].text} was captured on other token ids than the ones given: "
            "leave out --token-ids/--decode-ids, the store's own ids are used"
        )
    return steps


def _ids(steps: list[StepInfo]):
    return [(s.token_ids, s.positions) for s in steps]
