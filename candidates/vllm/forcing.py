"""Forced decode ids inside vLLM's own sampler: a V1 logits processor (vLLM imports it by this module's path).

A request whose `SamplingParams.extra_args` names a key in `FORCED` has, at its n-th sampled token, every
logit but `FORCED[key][n]`'s set to -inf, so greedy sampling picks exactly the forced id. The list grows as
the differ hands out decode steps (the engine runs in this process), so a step's id may be decided after
the forward that samples it has run.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTRA_KEY = "qwen3dbg_forced"
#: request key -> the decode ids forced so far
FORCED: dict[str, list[int]] = {}


def set_forced(key: str, ids: list[int] | None) -> None:
    """The decode ids forced on request key `key` so far (None: forget them)."""
    if ids is None:
        FORCED.pop(key, None)
    else:
        FORCED[key] = list(ids)


class ForcedIds(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: vLLM must apply it under greedy sampling too

    def new_req_logits_processor(self, params):
        key = (params.extra_args or {}).get(EXTRA_KEY)
        if key is None:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            ids = FORCED.get(key, ())
            if len(output_ids) >= len(ids):
                return logits  # a sample nothing will read (the run ended): leave it greedy
            forced = torch.full_like(logits, float("-inf"))
            forced[ids[len(output_ids)]] = 0.0
            return forced

        return force
