"""Resolving what the user asked to run: model directory, prompt ids and forced decode ids.

The flags are parsed here once, into `RunInputs`, by every command that runs implementations (capture,
diff), so all of them accept the same flags and fail the same way on bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen3dbg.model.checkpoint import Checkpoint
from qwen3dbg.model.config import Qwen3Config, load_config
from qwen3dbg.run.capture import forced_steps, greedy_decode_ids
from qwen3dbg.tapstore.store import StepInfo
from qwen3dbg.util.errors import UserError

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

    def steps(self, model_dir: Path, cfg: Qwen3Config) -> tuple[list[StepInfo], int]:
        """The steps whose ids are fixed now, and how many decode steps are still to be picked greedily by
        the fp64 golden."""
        ids = (
            _in_vocab(self.token_ids, cfg, "--token-ids")
            if self.token_ids is not None
            else tokenize(model_dir, self.prompt)
            if self.prompt is not None
            else [i % cfg.vocab_size for i in DEFAULT_PROMPT]
        )
        decode = _in_vocab(self.decode_ids, cfg, "--decode-ids") if self.decode_ids is not None else []
        return forced_steps(ids, decode), self.decode_steps or 0


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


def resolve_model(model: Path | None) -> tuple[Path, Qwen3Config]:
    """`--model DIR`, or the embedded synthetic default when omitted; its weights must fit its config."""
    if model is None:
        from qwen3dbg.model.synth import default_model_dir

        model = default_model_dir()
    model = Path(model)
    if not model.exists():
        raise UserError(f"model directory {model} does not exist: make one with `qwen3dbg make-model {model}`")
    if not model.is_dir():
        raise UserError(f"--model {model} is a file: pass the directory that holds config.json and the safetensors")
    cfg = load_config(model)
    Checkpoint(model).check_layout(cfg)
    return model, cfg


def resolve_steps(model_dir: Path, cfg: Qwen3Config, inputs: RunInputs) -> list[StepInfo]:
    """Fix every step's token ids before any implementation runs (`--decode-steps` picks them with one
    greedy fp64 run)."""
    steps, greedy = inputs.steps(model_dir, cfg)
    if greedy:
        from qwen3dbg.reference.qwen3 import Qwen3Reference

        decode = greedy_decode_ids(Qwen3Reference(model_dir, "float64"), steps[0].token_ids[0], greedy)
        steps = forced_steps(steps[0].token_ids[0], decode)
    return steps
