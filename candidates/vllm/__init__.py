"""`--cand vllm[:options]`: vLLM's own Qwen3 / Qwen3-MoE through its real engine (scheduler, paged KV cache,
CPU attention kernels), tapped tap by tap in eager mode; docs/engines.md.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; with `tp=N` or `workers=1` its model runs in
worker processes) from vLLM's CPU build, installed in a
venv of its own by .ci/install_vllm.sh. Each step of the differ is one or more forwards of the sequence
under test (`engine.Engine`); its rows are cut out of the flat token axis and brought to the schema by
`recorder.Recorder`. Options:
- `batch=N`: the sequence among N-1 others of different lengths, all in the same forwards;
- `chunk=K`: vLLM's chunked-prefill budget (`max_num_batched_tokens=K`): the prompt over several forwards;
- `prefix=N`: a first request computes the prompt's first N tokens (whole blocks) into the prefix cache,
  so the prefill computes positions N.. only;
- vLLM's knobs `kv_cache_dtype`, `block_size`, `max_model_len`, `hf_overrides` (`key:value;key:value`);
  the dtype is the diff's `--dtype`;
- `patch=FILE.py`: a file run before the model loads (once per process), to plant or fix a bug in vLLM;
- `threads`: torch threads for the process after vLLM's worker set its own (default: as before);
- `tp=N`: vLLM's tensor parallelism over N worker processes (`ranks`): each rank's taps come over a bounded
  channel (`channel`) with its shard's layout, read from vLLM's parallel layers, and are gathered tap by tap;
  `workers=1` runs a tp=1 engine's worker in a process of its own the same way.
- `speed=on`: after the run, vLLM decodes the same forced ids with capture off, eager and in its default
  compiled mode (`speed.py`), and the notes give both tokens/s beside the captured run's (minutes more).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
from pathlib import Path

import torch

from qwen3dbg.run.candidate import Candidate, option_flag
from qwen3dbg.model.model_dir import open_model
from qwen3dbg.util.dtypes import parse_dtype
from qwen3dbg.util.errors import UserError
from qwen3dbg.tapstore.schema import step_taps
from qwen3dbg.tapstore.store import TapSink

from .engine import NOT_INSTALLED, check_patch
from .recorder import CACHE_LAYOUT, MISSING, cache_layout

#: head sizes vLLM's CPU attention backend takes (CPUAttentionBackend.get_supported_head_sizes, 0.32)
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
EAGER_NOTE = (
    "vLLM ran in eager mode (enforce_eager): its module hooks do not fire in the compiled CPU mode, so the "
    "compiled path is not what was compared"
)
_keys = itertools.count()


def _whole(name: str, value, least: int) -> int:
    text = str(value)
    if not text.isdigit() or int(text) < least:
        raise UserError(f"vllm option {name}={value!r}: give a whole number of at least {least}")
    return int(text)


def _overrides(text: str) -> dict:
    """`key:value;key:value` (values as JSON: numbers, true/false, strings) -> vLLM's hf_overrides."""
    out = {}
    for item in filter(None, str(text).split(";")):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise UserError(f"vllm option hf_overrides={text!r}: write key:value;key:value, e.g. rope_theta:10000")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class VllmCandidate(Candidate):
    """vLLM's model and engine; every step's taps for the one sequence under test."""

    missing_taps = MISSING
    fresh_taps = True  # every tap is copied out of vLLM's buffers at its hook

    def __init__(
        self,
        model_dir,
        dtype="bfloat16",
        *,
        batch: int = 1,
        chunk: int = 0,
        prefix: int = 0,
        kv_cache_dtype: str = "auto",
        block_size: int = 128,
        max_model_len: int = 4096,
        hf_overrides: str = "",
        patch: str = "",
        threads: int = 0,
        tp: int = 1,
        workers: int = 0,
        speed: bool | str = False,
    ):
        o = _parse_options(
            batch=batch,
            chunk=chunk,
            prefix=prefix,
            kv_cache_dtype=kv_cache_dtype,
            block_size=block_size,
            max_model_len=max_model_len,
            hf_overrides=hf_overrides,
            patch=patch,
            threads=threads,
            tp=tp,
            workers=workers,
            speed=speed,
        )  # checked by `check` before (registry.load_candidate): parsed here, not checked again
        from .engine import Engine, import_vllm, run_patch
        from .recorder import Recorder

        self.config, self.dtype, self.options = open_model(model_dir, check_layout=False).config, parse_dtype(dtype), o
        self.name = "vllm" + "".join(f":{k}={v}" for k, v in o["given"].items())
        import_vllm()
        if patch and not o["workers"]:  # else each worker process runs it (worker.py)
            run_patch(patch)
        c = self.config
        itemsize = 1 if o["kv_cache_dtype"] != "auto" else self.dtype.itemsize
        per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * itemsize
        sequences = o["batch"] + (1 if o["prefix"] else 0)
        # whole blocks, one more than a sequence of max_model_len fills: vLLM counts its cache in whole blocks, and
        # given the bytes of max_model_len + block_size tokens, max_model_len=200 found room for 128 tokens only
        blocks = -(-o["max_model_len"] // o["block_size"]) + 1
        tokens = sequences * blocks * o["block_size"]
        self.engine = Engine(
            Path(model_dir),
            self.dtype,
            block_size=o["block_size"],
            max_model_len=o["max_model_len"],
            max_batched=o["chunk"] or o["max_model_len"] * o["batch"],
            kv_cache_dtype=o["kv_cache_dtype"],
            prefix_caching=bool(o["prefix"]),
            max_seqs=sequences,
            hf_overrides=o["hf_overrides"],
            kv_cache_bytes=per_token * tokens,
            threads=o["threads"] or torch.get_num_threads(),
            moe=c.num_experts > 0,
            tp=o["tp"],
            workers=o["workers"],
            patch=patch,
        )
        self.notes: list[str] = []
        if o["workers"]:
            from . import ranks
            from .channel import Receiver

            self.recorder = None
            self.receiver = Receiver(o["tp"])
            self.engine.rpc(ranks.install, self.receiver.address, self.receiver.authkey, c)
            self.receiver.connected()
            self.notes.append(
                f"vLLM ran {o['tp']} worker process(es) (tensor_parallel_size={o['tp']}); each tap was gathered from "
                "the ranks' shards, laid out as vLLM's parallel layers hold them (docs/engines.md)"
            )
            layout = self.engine.rpc(ranks.cache_layout)[0]
        else:
            self.recorder = Recorder(self.engine.model, self.engine.runner, c)
            layout = cache_layout(self.engine.model)
        if layout != CACHE_LAYOUT:
            self.missing_taps = self.missing_taps | {"k_cache", "v_cache"}
            self.notes.append(
                f"k_cache/v_cache not compared: vLLM's CPU attention keeps its cache in its {layout!r} layout "
                f"here, which this adapter does not read (it reads {CACHE_LAYOUT!r})"
            )
        self.req: str | None = None
        self.key = ""
        self.model_dir, self.kv_cache_bytes = Path(model_dir), per_token * tokens
        self.ids: tuple[list[int], list[int]] = ([], [])  # the run's prompt and forced decode ids
        self.decode_seconds = 0.0
        self.speeds: dict[str, float] | None = None

    @staticmethod
    def check(model_dir, dtype="bfloat16", **options) -> dict:
        """Every option and the model's head size checked, vLLM found, without loading anything
        (`qwen3dbg.run.registry.check_candidate`); returns the options parsed."""
        o = _parse_options(**options)
        if options.get("patch"):
            check_patch(options["patch"])
        parse_dtype(dtype)
        cfg = open_model(model_dir, check_layout=False).config
        head_dim = cfg.head_dim
        if head_dim not in HEAD_SIZES:
            raise UserError(
                f"vLLM's CPU attention takes head_dim {', '.join(map(str, HEAD_SIZES))}; this model has "
                f"{head_dim} (the tiny presets have 32)"
            )
        _check_parallel(o["tp"], cfg)
        if importlib.util.find_spec("vllm") is None:
            raise UserError(NOT_INSTALLED)
        return o

    def logits_positions(self, info) -> list[int] | None:
        """vLLM computes logits at the last token each forward schedules for a sequence: a prefill's last
        position, or each chunk's (a capture plans them; with companions the chunks are the scheduler's)."""
        pos, o = info.positions[0], self.options
        if o["workers"]:
            raise UserError(
                "vllm:tp=N (or workers=1) hands each tap gathered from its ranks, which a capture does not "
                "write: diff it instead (qwen3dbg diff --cand vllm:tp=N)"
            )
        if len(pos) == 1:
            return None
        if o["prefix"]:
            raise UserError(
                "vllm:prefix=N leaves the cached positions of the prefill uncomputed, which a tap store cannot "
                "hold: diff it instead (qwen3dbg diff --cand vllm:prefix=N)"
            )
        if o["chunk"] and o["batch"] > 1:
            raise UserError(
                "vllm:batch=N,chunk=K: where vLLM's scheduler cuts the prompt depends on the other sequences, so a "
                "capture cannot plan its logits rows: diff it instead, or capture one of the two options"
            )
        step = o["chunk"] or len(pos)
        return [min(start + step, len(pos)) - 1 for start in range(0, len(pos), step)]

    def manifest_extra(self) -> dict:
        return {
            "vllm": self.engine.version,
            "vllm_options": self.options["given"],
            "notes": [EAGER_NOTE, *self.notes, *self._speed_notes()],
        }

    def _speed_notes(self) -> list[str]:
        """The captured decode's tokens/s, and with `speed=on` vLLM's own with capture off, eager and compiled."""
        prompt, decode = self.ids
        if not decode:
            return []
        notes = [
            f"vLLM's {len(decode)} decode steps ran at {len(decode) / self.decode_seconds:.3g} tokens/s here, eager "
            "with capture on (the comparison's pace included)"
        ]
        if not self.options["speed"]:
            return notes
        if len(decode) < 2:
            return [*notes, "speed=on needs at least 2 decode steps: vLLM's own tokens/s were not measured"]
        from .speed import TIMED_TOKENS, decode_tokens_per_s

        if self.speeds is None:
            self.speeds = {
                mode: decode_tokens_per_s(
                    self.model_dir,
                    self.dtype,
                    prompt,
                    decode,
                    compiled=mode == "compiled",
                    max_model_len=self.options["max_model_len"],
                    kv_cache_bytes=self.kv_cache_bytes,
                    threads=self.options["threads"] or torch.get_num_threads(),
                )
                for mode in ("eager", "compiled")
            }
        return [
            *notes,
            f"vLLM alone on the same ids (its first {min(len(decode), TIMED_TOKENS)} decode steps), capture off: "
            f"{_rate(self.speeds['eager'])} eager, "
            f"{_rate(self.speeds['compiled'])} compiled (its default CPU mode, which no capture sees)",
        ]

    def reset(self) -> None:
        self.engine.clear()
        if self.key:
            self.engine.force(self.key, None)
        self.req = None
        self.ids, self.decode_seconds = ([], []), 0.0

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink) -> torch.Tensor:
        """One step of the sequence under test (a prefill: every forward until its prompt is computed; a
        decode: the forward after its forced id was sampled). Returns the logits vLLM computed at the
        step's last position, [1,1,V]: the only row it computes."""
        from .recorder import StepCapture

        if ids.shape[0] != 1:
            raise UserError("vllm: the sequence under test is batch 1; batch=N adds the others in vLLM itself")
        tokens, pos = ids[0].tolist(), positions[0].tolist()
        if pos[-1] + 1 > self.options["max_model_len"]:
            raise UserError(
                f"vllm: position {pos[-1]} is past max_model_len={self.options['max_model_len']}: "
                "pass vllm:max_model_len=N"
            )
        if self.options["workers"]:
            computed, last_logits = self._ranks_step(tokens, pos, sink)
        else:
            capture = StepCapture(sink, pos, self.config)
            self.recorder.step = capture
            try:
                self._forwards(tokens, pos)
                capture.finish()
            finally:
                self.recorder.step = None
            computed, last_logits = capture.computed, capture.last_logits
        missing = sorted(set(pos) - set(computed))
        if missing and pos[0] != 0:
            raise RuntimeError(f"vLLM's forward did not compute position {missing[0]} of the sequence under test")
        if missing:
            self.notes.append(
                f"positions {missing[0]}..{missing[-1]} of the prompt came from vLLM's prefix cache (prefix="
                f"{self.options['prefix']}): the prefill's taps hold positions {missing[-1] + 1}.. only, its "
                "k_cache/v_cache every position"
            )
        return last_logits

    def _forwards(self, tokens: list[int], pos: list[int]) -> None:
        """The step's forwards, the run's ids and the decode's time kept for the report's tokens/s."""
        if self.req is None:
            self._prefill(tokens, pos)
            self.ids = (tokens, [])
        else:
            t = time.perf_counter()
            self._decode(tokens)
            self.decode_seconds += time.perf_counter() - t
            self.ids[1].append(tokens[0])

    def _ranks_step(self, tokens: list[int], pos: list[int], sink: TapSink):
        """A step run in vLLM's worker processes: their taps are received and gathered (in a thread of this
        process, so that a worker blocked on its channel never stalls the forward this thread waits for)
        while this thread drives the engine. Returns (positions computed, logits at the last)."""
        import threading

        from . import ranks

        c = self.config
        wanted = [s.name for s in step_taps(c, 1, len(pos), pos[-1] + 1) if sink.wants(s.name)]
        self.engine.rpc(ranks.begin_step, pos, wanted)
        failed: list[BaseException | None] = []

        def receive() -> None:
            try:
                failed.append(self.receiver.step(sink))
            except BaseException as e:  # noqa: BLE001  # raised below, in the producer's thread
                failed.append(e)

        thread = threading.Thread(target=receive, name="qwen3dbg-vllm-ranks", daemon=True)
        thread.start()
        try:
            self._forwards(tokens, pos)
        finally:
            ends = self.engine.rpc(ranks.end_step)
            thread.join()
        if failed and failed[0] is not None:
            raise failed[0]
        return ends[0]

    def _prefill(self, tokens: list[int], pos: list[int]) -> None:
        o, e = self.options, self.engine
        if pos != list(range(len(tokens))):
            raise UserError("vllm: the first step must prefill positions 0..T-1")
        if o["prefix"] >= len(tokens):
            raise UserError(f"vllm option prefix={o['prefix']}: the prompt has {len(tokens)} tokens; give fewer")
        room = o["max_model_len"]
        if o["prefix"]:
            first = e.add(tokens[: o["prefix"]] + [(tokens[o["prefix"]] + 1) % self.config.vocab_size], max_tokens=1)
            while not e.finished(first):
                e.forward()
                e.sample()
        for j, n in enumerate(_companion_lengths(len(tokens), o["batch"] - 1)):
            g = torch.Generator().manual_seed(j)
            e.add(torch.randint(0, self.config.vocab_size, (n,), generator=g).tolist(), max_tokens=room - n)
        self.key = f"qwen3dbg-forced-{next(_keys)}"
        self.forced = []
        e.force(self.key, self.forced)
        self.req = e.add(tokens, max_tokens=room - len(tokens), forced=self.key)
        if o["workers"]:
            from . import ranks

            e.rpc(ranks.watch, self.req)
        else:
            self.recorder.req_id = self.req
        while e.computed(self.req) < len(tokens):
            e.forward()

    def _decode(self, tokens: list[int]) -> None:
        self.forced.append(tokens[0])
        self.engine.force(self.key, self.forced)
        self.engine.forward()


_DEFAULTS = {
    "batch": 1,
    "chunk": 0,
    "prefix": 0,
    "kv_cache_dtype": "auto",
    "block_size": 128,
    "max_model_len": 4096,
    "tp": 1,
    "workers": 0,
}


def _companion_lengths(length: int, n: int) -> list[int]:
    """Prompt lengths of the sequences beside the one under test: all different from it and from each other."""
    out: list[int] = []
    for j in range(n):
        m = max(1, length // 2 + 1 + 7 * j) if j % 2 == 0 else length + 3 + 5 * j
        while m == length or m in out:
            m += 1
        out.append(m)
    return out


def _rate(tokens_per_s: float | None) -> str:
    return "no tokens/s (the timing was within its noise)" if tokens_per_s is None else f"{tokens_per_s:.3g} tokens/s"


def _parse_options(**options) -> dict:
    """The options as `--cand vllm:key=value` gives them (strings), parsed and their values checked."""
    given = {k: v for k, v in options.items() if v not in ("", 0, None)}
    o = {
        "batch": _whole("batch", options.get("batch", 1), 1),
        "chunk": _whole("chunk", options.get("chunk", 0), 0),
        "prefix": _whole("prefix", options.get("prefix", 0), 0),
        "block_size": _whole("block_size", options.get("block_size", 128), 32),
        "max_model_len": _whole("max_model_len", options.get("max_model_len", 4096), 2),
        "threads": _whole("threads", options.get("threads", 0), 0),
        "tp": _whole("tp", options.get("tp", 1), 1),
        "speed": option_flag("vllm", "speed", options.get("speed", False)),
        "kv_cache_dtype": str(options.get("kv_cache_dtype", "auto")),
        "hf_overrides": _overrides(options.get("hf_overrides", "")),
        "given": {k: v for k, v in given.items() if str(v) != str(_DEFAULTS.get(k))},
    }
    workers = _whole("workers", options.get("workers", 0), 0)
    if workers > 1:
        raise UserError(f"vllm option workers={workers}: give 1 (a worker process at tp=1); tp=N runs N")
    cores = len(os.sched_getaffinity(0))
    if o["tp"] > cores:
        raise UserError(
            f"vllm option tp={o['tp']}: vLLM's CPU build runs one worker per rank on cores of its own, and "
            f"{cores} are available here"
        )
    o["workers"] = o["tp"] > 1 or workers == 1
    if o["speed"] and o["workers"]:
        raise UserError(
            "vllm option speed=on times vLLM in this process, at tp=1: drop it, or drop tp/workers (bench/"
            "bench_vllm.py times a tp=2 run)"
        )
    if o["block_size"] % 32:
        raise UserError(f"vllm option block_size={o['block_size']}: vLLM's CPU cache takes multiples of 32")
    if o["prefix"] % o["block_size"]:
        raise UserError(
            f"vllm option prefix={o['prefix']}: vLLM caches whole blocks, give a multiple of "
            f"block_size={o['block_size']}"
        )
    if o["kv_cache_dtype"] not in KV_CACHE_DTYPES:
        raise UserError(
            f"vllm option kv_cache_dtype={o['kv_cache_dtype']!r}: choose one of {', '.join(KV_CACHE_DTYPES)}"
        )
    return o


def _check_parallel(tp: int, cfg) -> None:
    """What vLLM's parallel layers need of the model to split it over `tp` ranks, in one sentence."""
    if tp == 1:
        return
    kv = cfg.num_key_value_heads
    widths = {"num_attention_heads": cfg.num_attention_heads}
    widths.update({"moe_intermediate_size": cfg.moe_intermediate_size} if cfg.num_experts else {})
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        widths["intermediate_size"] = cfg.intermediate_size
    bad = [f"{k}={v}" for k, v in widths.items() if v % tp]
    if kv % tp and tp % kv:
        bad.append(f"num_key_value_heads={kv} (nor does tp divide by it)")
    if bad:
        raise UserError(
            f"vllm option tp={tp}: vLLM splits the model's heads and columns evenly over the ranks, and {tp} "
            f"does not divide {', '.join(bad)}"
        )
