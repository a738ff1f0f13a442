"""Resolving what the user asked to run: model directory, prompt ids and forced decode ids.

Shared by every command that runs implementations, so all of them accept the same flags and
fail the same way on bad input.
"""

from __future__ import annotations

from pathlib import Path

from qwen3dbg.capture import DEFAULT_PROMPT, forced_steps, greedy_decode_ids, parse_ids, tokenize
from qwen3dbg.checkpoint import Checkpoint
from qwen3dbg.config import Qwen3Config, load_config
from qwen3dbg.errors import UserError
from qwen3dbg.store import StepInfo


def resolve_model(model: Path | None) -> tuple[Path, Qwen3Config]:
    """`--model DIR`, or the embedded synthetic default when omitted; its weights must fit its config."""
    if model is None:
        from qwen3dbg.synth import default_model_dir

        model = default_model_dir()
    model = Path(model)
    if not model.exists():
        raise UserError(f"model directory {model} does not exist: make one with `qwen3dbg make-model {model}`")
    if not model.is_dir():
        raise UserError(f"--model {model} is a file: pass the directory that holds config.json and the safetensors")
    cfg = load_config(model)
    Checkpoint(model).check_layout(cfg)
    return model, cfg


def resolve_steps(model_dir: Path, cfg: Qwen3Config, token_ids: str | None, prompt: str | None,
                  decode_ids: str | None, decode_steps: int | None) -> list[StepInfo]:
    """Fix every step's token ids before any implementation runs (`--decode-steps` picks them with one
    greedy fp64 run)."""
    steps, greedy = resolve_inputs(model_dir, cfg, token_ids, prompt, decode_ids, decode_steps)
    if greedy:
        from qwen3dbg.reference.qwen3 import Qwen3Reference

        decode = greedy_decode_ids(Qwen3Reference(model_dir, "float64"), steps[0].token_ids[0], greedy)
        steps = forced_steps(steps[0].token_ids[0], decode)
    return steps


def resolve_inputs(model_dir: Path, cfg: Qwen3Config, token_ids: str | None, prompt: str | None,
                   decode_ids: str | None, decode_steps: int | None) -> tuple[list[StepInfo], int]:
    """The steps whose ids are fixed now, and how many decode steps are still to be picked greedily by the
    fp64 golden. A flag given empty is an error, not a request for the default: the user meant some ids
    and would get others."""
    if token_ids is not None and prompt is not None:
        raise UserError("give either --token-ids or --prompt, not both")
    if decode_ids is not None and decode_steps is not None:
        raise UserError("give either --decode-ids or --decode-steps, not both")
    if decode_steps is not None and decode_steps < 0:
        raise UserError("--decode-steps must be 0 or more")
    ids = parse_ids(token_ids, cfg) if token_ids is not None else tokenize(model_dir, prompt) \
        if prompt is not None else [i % cfg.vocab_size for i in DEFAULT_PROMPT]
    decode = parse_ids(decode_ids, cfg, "--decode-ids") if decode_ids is not None else []
    return forced_steps(ids, decode), (decode_steps or 0) if decode_ids is None else 0
