"""What `--ref`, `--cand` and `--impl` name: an implementation to run (`hf`, `hf:attn=sdpa`, a catalogue bug,
`module:...`), `store:DIR` (a tap store whose token ids the other sides then run on) or `store:DIR0,DIR1,...` (the
ranks of one tensor-parallel run). Parsing is pure text, imports nothing heavy: a misspelt side is refused at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3dbg.util.errors import UserError

if TYPE_CHECKING:
    from qwen3dbg.tapstore.shards import RankStores
    from qwen3dbg.model.config import Qwen3Config
    from qwen3dbg.tapstore.store import StepInfo, TapStore

STORE_PREFIX = "store:"


@dataclass(frozen=True)
class SideSpec:
    text: str
    role: str
    name: str | None = None  # implementation name, None for a store
    options: dict = field(default_factory=dict)
    store_paths: tuple[Path, ...] = ()  # one store, or one per rank
    store: TapStore | RankStores | None = None  # opened and validated by `open_store`


def parse_side(text: str, role: str) -> SideSpec:
    """`hf` | `hf:attn=sdpa,k=v` | `store:DIR` | `module:port.py:load` -> SideSpec, from the text alone: a
    registered name takes `:key=value` options, a prefixed name (`module:`, `llamacpp:`) is passed whole to the
    registry, any other name must be registered (with a did-you-mean)."""
    from qwen3dbg.run.registry import IMPLEMENTATIONS, check_name

    text = text.strip()
    if text.startswith(STORE_PREFIX):
        given = text[len(STORE_PREFIX) :]  # a directory whose own name holds a comma is one store
        paths = [Path(given)] if Path(given).is_dir() else [Path(p) for p in given.split(",")]
        for path in paths:
            if not path.is_dir():
                raise UserError(f"--{role} {text}: {path} is not a directory holding a tap store")
        return SideSpec(text, role, store_paths=tuple(paths))
    if not text:
        raise UserError(f"--{role} is empty: name an implementation (hf, scratch, ...) or store:DIR")
    name, _, opts = text.partition(":")
    if name not in IMPLEMENTATIONS:
        check_name(text)
        return SideSpec(text, role, name=text)
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--{role} {text}: options are written NAME:key=value,key=value, e.g. hf:attn=sdpa")
        options[key] = value
    return SideSpec(text, role, name=name, options=options)


def open_store(spec: SideSpec, config: Qwen3Config) -> SideSpec:
    """A store side validated against the model of the run (its taps' shapes, its token ids) and opened; a
    store written by one rank of several is refused alone."""
    from qwen3dbg.tapstore.shards import RankStores
    from qwen3dbg.tapstore.store import TapStore
    from qwen3dbg.tapstore.validate import validate_ranks, validate_store

    paths, role, text = spec.store_paths, spec.role, spec.text
    problems = validate_store(paths[0], config) if len(paths) == 1 else validate_ranks(list(paths), config)
    if problems:
        raise UserError(
            f"--{role} {text} is not a valid tap store, {problems[0]}"
            f"{f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''}: "
            f"see `qwen3dbg validate-store {' '.join(map(str, paths))}`"
        )
    if len(paths) > 1:
        return dataclasses.replace(spec, store=RankStores.open(list(paths)))
    store = TapStore.open(paths[0])
    if store.rank is not None and store.rank.world_size > 1:
        raise UserError(
            f"--{role} {text} holds rank {store.rank.rank} of a {store.rank.world_size}-rank run: name every "
            f'rank\'s store, store:DIR0,DIR1,... (docs/taps.md, "Tensor-parallel runs")'
        )
    return dataclasses.replace(spec, store=store if store.rank is None else RankStores([store]))


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
