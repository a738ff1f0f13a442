"""vLLM's worker extension for runs in worker processes (`vllm:tp=N`, `workers=1`): vLLM imports this module in
each worker process (`worker_extension_cls`) before the model loads, which runs the patch file that the diff's
process named in `PATCH_ENV` (`vllm:patch=FILE`): vLLM's CPU build spawns its workers, which inherit no class
the diff's process patched."""

from __future__ import annotations

import os

from .engine import PATCH_ENV, run_patch

if os.environ.get(PATCH_ENV):
    run_patch(os.environ[PATCH_ENV])


class PatchedWorker:
    """Adds nothing to vLLM's worker: importing its module is what runs the patch."""
