"""What a library prints while we call it (transformers' FutureWarnings, its LOAD REPORT with raw ANSI
codes) stays out of our output; `--verbose` lets it through. Silenced per call, never process-wide."""

from __future__ import annotations

import contextlib
import threading
import warnings

_verbose = [False]
# The diff runs its sides in threads, and two may call transformers at once (hf against hf:attn=sdpa):
# the silence starts with the first call in and ends with the last one out, so neither restores the
# other's state and none outlives them.
_lock = threading.Lock()
_inside: dict = {"calls": 0, "restore": None}


def set_verbose(on: bool) -> None:
    """The CLI's --verbose: third-party warnings and banners reach the terminal again."""
    _verbose[0] = on


@contextlib.contextmanager
def quiet_transformers():
    """For the length of a call into transformers: Python warnings are ignored and transformers' logger
    says errors only; both are restored when the last such call returns."""
    if _verbose[0]:
        yield
        return
    from transformers.utils import logging as hf_logging

    with _lock:
        if _inside["calls"] == 0:
            saved = warnings.catch_warnings()
            saved.__enter__()
            warnings.simplefilter("ignore")
            _inside["restore"] = (saved, hf_logging.get_verbosity())
            hf_logging.set_verbosity_error()
        _inside["calls"] += 1
    try:
        yield
    finally:
        with _lock:
            _inside["calls"] -= 1
            if _inside["calls"] == 0:
                saved, level = _inside["restore"]
                saved.__exit__(None, None, None)
                hf_logging.set_verbosity(level)
