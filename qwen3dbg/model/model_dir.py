"""A model directory opened once: its config parsed and its checkpoint indexed, handed to every reader of ours."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3dbg.model.config import Qwen3Config, load_config
from qwen3dbg.util.errors import UserError

if TYPE_CHECKING:
    from qwen3dbg.model.checkpoint import Checkpoint


@dataclass(frozen=True)
class ModelDir:
    path: Path
    config: Qwen3Config
    checkpoint: Checkpoint

    def __fspath__(self) -> str:  # what loads files itself (transformers, a port's load) gets the directory
        return str(self.path)


def check_model_path(model: Path) -> None:
    """What can be said of `--model` before anything is imported: it exists and is a directory."""
    if not model.exists():
        raise UserError(f"model directory {model} does not exist: make one with `qwen3dbg make-model {model}`")
    if not model.is_dir():
        raise UserError(f"--model {model} is a file: pass the directory that holds config.json and the safetensors")


def open_model(model: str | Path | ModelDir | None, *, check_layout: bool = True) -> ModelDir:
    """`--model DIR`, or the embedded synthetic default when None; its weights must fit its config (unless
    `check_layout` is False: an implementation handed a bare path checks only what it reads). A ModelDir is
    returned as it is, so that a reader given one opens nothing again."""
    from qwen3dbg.model.checkpoint import Checkpoint  # torch: not for a refusal of the path

    if isinstance(model, ModelDir):
        return model
    if model is None:
        from qwen3dbg.model.synth import default_model_dir

        model = default_model_dir()
    model = Path(model)
    check_model_path(model)
    cfg = load_config(model)
    ckpt = Checkpoint(model)
    if check_layout:
        ckpt.check_layout(cfg)
    return ModelDir(model, cfg, ckpt)
