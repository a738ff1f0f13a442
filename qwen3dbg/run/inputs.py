"""The ids a run is asked for, parsed from the flags once and before anything heavy is imported: a wrong id
list is refused in a fraction of a second, the same way by every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from qwen3dbg.util.errors import UserError

if TYPE_CHECKING:
    from qwen3dbg.model.config import Qwen3Config

DEFAULT_PROMPT = [9, 41, 7, 300, 12, 5, 77, 150, 3, 99, 64, 201, 18, 2, 450, 33]


@dataclass(frozen=True)
class RunInputs:
    """The ids a run is asked for, before a model is known: a prompt as ids or text (neither: the default
    prompt), then forced decode ids or a number of greedy decode steps (neither: prefill only). A field
    given empty is an error, not a request for the default: the user meant some ids and would get others."""

    token_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    decode_ids: tuple[int, ...] | None = None
    decode_steps: int | None = None

    def __post_init__(self):
        if self.token_ids is not None and self.prompt is not None:
            raise UserError("give either --token-ids or --prompt, not both")
        if self.decode_ids is not None and self.decode_steps is not None:
            raise UserError("give either --decode-ids or --decode-steps, not both")
        if self.decode_steps is not None and self.decode_steps < 0:
            raise UserError("--decode-steps must be 0 or more")
        for what, ids in (("--token-ids", self.token_ids), ("--decode-ids", self.decode_ids)):
            if ids is not None and not ids:
                raise UserError(f"{what} is empty: give at least one token id")
        if self.prompt is not None and not self.prompt:
            raise UserError("--prompt is empty: give some text, or leave it out for the default prompt")
        # a caller's lists are kept as tuples: a frozen value
        object.__setattr__(self, "token_ids", _ids(self.token_ids))
        object.__setattr__(self, "decode_ids", _ids(self.decode_ids))

    @classmethod
    def from_flags(
        cls,
        token_ids: str | None = None,
        prompt: str | None = None,
        decode_ids: str | None = None,
        decode_steps: int | None = None,
    ) -> RunInputs:
        """The CLI's --token-ids, --prompt, --decode-ids and --decode-steps, as capture and diff both take them."""
        return cls(
            parse_ids(token_ids, "--token-ids") if token_ids is not None else None,
            prompt,
            parse_ids(decode_ids, "--decode-ids") if decode_ids is not None else None,
            decode_steps,
        )

    @property
    def picks_ids(self) -> bool:
        """Whether some ids are left to a tokenizer or to the golden's greedy picks (a tap store fixes its own)."""
        return self.prompt is not None or self.decode_steps is not None

    def ids(self, model_dir: Path, cfg: Qwen3Config) -> tuple[list[int], list[int], int]:
        """The prompt ids, the forced decode ids, and how many decode steps are left to the golden's greedy picks."""
        prompt = (
            _in_vocab(self.token_ids, cfg, "--token-ids")
            if self.token_ids is not None
            else tokenize(model_dir, self.prompt)
            if self.prompt is not None
            else [i % cfg.vocab_size for i in DEFAULT_PROMPT]
        )
        decode = _in_vocab(self.decode_ids, cfg, "--decode-ids") if self.decode_ids is not None else []
        return prompt, decode, self.decode_steps or 0


def _ids(ids) -> tuple[int, ...] | None:
    return None if ids is None else tuple(int(i) for i in ids)


def parse_ids(text: str, what: str = "--token-ids") -> list[int]:
    """'5,17,99' -> [5, 17, 99]."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of integers, e.g. '5,17,99'") from None
    if not ids:
        raise UserError(f"{what} is empty: give at least one token id")
    return ids


def _in_vocab(ids: tuple[int, ...], cfg: Qwen3Config, what: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise UserError(f"{what}: ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    return list(ids)


def tokenize(model_dir: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    no_tokenizer = UserError(f"{model_dir} has no tokenizer (synthetic models have none): pass --token-ids instead")
    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise no_tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError):
        raise no_tokenizer from None
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise UserError("--prompt tokenizes to nothing")
    return ids
