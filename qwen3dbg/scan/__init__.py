"""Checkpoint linting (`scan-checkpoint`) and tensor-by-tensor checkpoint comparison (`diff-weights`)."""
