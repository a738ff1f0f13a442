"""The differ: three sides compared tap by tap against an fp64 golden, the first divergent op found and explained.
`run_diff(...) -> DiffResult` is the whole command; the CLI and the reports only render its result."""

from qwen3dbg.diff.result import DiffResult, Divergence, TapResult
from qwen3dbg.diff.run import diff_plan, run_diff

__all__ = ["run_diff", "diff_plan", "DiffResult", "Divergence", "TapResult"]
