"""What a library prints while we call it (transformers' FutureWarnings, its LOAD REPORT with raw ANSI
codes) stays out of our output; `--verbose` lets it through. Silenced per call, never process-wide."""

from __future__ import annotations

import contextlib
import warnings

_verbose = [False]


def set_verbose(on: bool) -> None:
    """The CLI's --verbose: third-party warnings and banners reach the terminal again."""
    _verbose[0] = on


@contextlib.contextmanager
def quiet_transformers():
    """For the length of one call into transformers: its Python warnings are ignored and its logger says
    errors only; both are restored on exit."""
    if _verbose[0]:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
