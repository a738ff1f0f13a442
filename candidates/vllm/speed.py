"""vLLM's decode tokens/s on a run's forced ids with capture off: in the eager mode a capture runs in, and in
its default CPU mode (dynamo + inductor), whose forwards no hook sees (`vllm:speed=on`, bench/bench_vllm.py)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

_keys = itertools.count()
#: forced ids timed at most: at the 0.6B shape vLLM decodes about 0.5 tokens/s on 2 cores, so all 256 of a long
#: run would take minutes per mode
TIMED_TOKENS = 32
#: timed runs of each length, the fastest kept
RUNS = 3


def decode_tokens_per_s(
    model_dir: Path,
    dtype: torch.dtype,
    prompt: list[int],
    decode: list[int],
    *,
    compiled: bool,
    max_model_len: int,
    kv_cache_bytes: int,
    threads: int,
) -> float | None:
    """Tokens/s of vLLM's own generate loop decoding the first TIMED_TOKENS of `decode` (forced) after `prompt`:
    the time of that many tokens less that of one, so neither the prefill nor the first sample counts; a first
    run compiles. None when the longer run was not the slower one: the difference is timing noise."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from qwen3dbg.candidates.vllm.engine import threads_here
    from qwen3dbg.candidates.vllm.forcing import EXTRA_KEY, FORCED

    assert len(decode) >= 2, "a rate needs two decode steps"
    decode = decode[:TIMED_TOKENS]
    key = f"qwen3dbg-speed-{next(_keys)}"
    FORCED[key] = list(decode)
    set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op for the process
    try:
        llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype=str(dtype).removeprefix("torch."),
            enforce_eager=not compiled,
            max_model_len=max_model_len,
            gpu_memory_utilization=0.01,
            kv_cache_memory_bytes=kv_cache_bytes,
            logits_processors=["qwen3dbg.candidates.vllm.forcing:ForcedIds"],
        )
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)

    def run(n: int) -> float:
        threads_here(threads)
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, extra_args={EXTRA_KEY: key})
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return time.perf_counter() - t

    try:
        run(2)  # compiles (the compiled mode) and fills the prefix cache, so the timed runs' prefills are short
        # the fastest of a few runs each: on a loaded machine one run of 3 tokens once took less than one of 1
        one = min(run(1) for _ in range(RUNS))
        full = min(run(len(decode)) for _ in range(RUNS))
    finally:
        FORCED.pop(key, None)
    return (len(decode) - 1) / (full - one) if full > one else None
