"""`qwen3dbg selftest`: the engine on a device against its CPU twin and HF eager, tap by tap, and its
speed next to HF eager and sdpa measured in the same run. One result object; reports/selftest_terminal.py and
reports/selftest_json.py render it."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qwen3dbg.diff.metrics import ulps_apart
from qwen3dbg.run.candidate import NullSink
from qwen3dbg.run.capture import capture, capture_step, forced_steps, run_steps, store_writer
from qwen3dbg.tapstore.store import StepInfo, TapStore, is_cache_tap
from qwen3dbg.util.dtypes import dtype_name


@dataclass(frozen=True)
class TapRow:
    tap: str
    ulps_vs_twin: int | None  # largest distance over all steps, in representable steps (0: bit-identical)
    identical_vs_hf: float  # fraction of elements bit-identical to HF eager on the same device
    rel_err_vs_hf: float  # max |mine - hf| / max |hf| over all steps (finite entries)


@dataclass(frozen=True)
class SpeedRow:
    impl: str
    prefill_tok_s: float
    decode_tok_s: float


@dataclass
class SelftestResult:
    model: str
    device: str
    dtype: str
    prompt_tokens: int
    decode_steps: int
    check_tokens: int
    check_decode: int
    taps: list[TapRow] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)
    store_identical: bool = False  # a capture to a tap store holds the same bits as the in-memory taps
    uncaptured_identical: bool = False  # capture off (on a GPU: decode by CUDA graph) gives the same logits
    weights_bytes: int = 0
    bandwidth_gb_s: float | None = None  # nominal, for the decode limit (None: unknown device)

    @property
    def bandwidth_limit_tok_s(self) -> float | None:
        """Decode tokens/s if every weight byte is read once per token at the nominal bandwidth."""
        return self.bandwidth_gb_s * 1e9 / self.weights_bytes if self.bandwidth_gb_s else None

    @property
    def problems(self) -> list[str]:
        """What fails the check: taps whose device bits differ from the twin's, a store that changed bits."""
        out = [
            f"{row.tap} differs from the CPU twin by up to {row.ulps_vs_twin} ulps"
            for row in self.taps
            if row.ulps_vs_twin
        ]
        if not self.store_identical:
            out.append("a capture to a tap store does not read back as the taps the engine emitted")
        if not self.uncaptured_identical:
            out.append("with capture off (decode by CUDA graph on a GPU) the logits differ from the captured run's")
        return out

    @property
    def exit_code(self) -> int:
        """0 when every check holds, 1 on any of `problems`."""
        return int(bool(self.problems))

    def to_dict(self) -> dict:
        return {**asdict(self), "bandwidth_limit_tok_s": self.bandwidth_limit_tok_s, "problems": self.problems}


NOMINAL_GB_S = {"H100": 3350.0, "H200": 4800.0, "A100": 2000.0}


def identical_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    return same.double().mean().item() if a.numel() else 1.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return float(not torch.equal(a, b))
    finite = torch.isfinite(b)
    scale = b[finite].double().abs().max().item() if finite.any() else 0.0
    return (a[finite].double() - b[finite].double()).abs().max().item() / scale if scale else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(reset, step, device: torch.device, prompt: list[int], decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of `step(ids [1,T], positions [1,T]) -> logits`, the second of
    two runs (the first warms up: build, graph capture, allocator). Each decode step picks its token
    with argmax, as a real decode loop must, so every implementation syncs once per token."""
    for _ in range(2):
        reset()
        _sync(device)
        t0 = time.perf_counter()
        logits = step(torch.tensor([prompt]), torch.arange(len(prompt))[None])
        _sync(device)
        t1 = time.perf_counter()
        token = int(logits[0, -1].argmax())
        for i in range(decode):
            token = int(step(torch.tensor([[token]]), torch.tensor([[len(prompt) + i]]))[0, -1].argmax())
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode / (t2 - t1)


def plain_stepper(engine):
    """(reset, step) of the engine with capture off: what a user of it runs."""
    return engine.reset, lambda ids, positions: engine.step(ids, positions, NullSink())


def hf_stepper(hf):
    """HF's own forward with its own cache and no capture hooks: what a user of transformers runs."""
    from transformers import DynamicCache

    state = {}

    def reset():
        state["cache"] = DynamicCache(config=hf.model.config)

    @torch.no_grad()
    def step(ids, positions):
        dev = hf.model.device
        return hf.model(
            input_ids=ids.to(dev), position_ids=positions.to(dev), past_key_values=state["cache"], use_cache=True
        ).logits

    return reset, step


def capture_stepper(engine, out_dir: Path):
    """(reset, step) that stream every tap of each step into a tap store, as `qwen3dbg capture` does."""
    state = {}

    def reset():  # each run writes its own store: a writer holds its directory until it is closed
        engine.reset()
        runs = state.get("runs", 0)
        state.update(writer=store_writer(engine, out_dir / f"run{runs}", 1), step=0, runs=runs + 1)

    def step(ids, positions):
        info = StepInfo(state["step"], ids.tolist(), positions.tolist())
        state["step"] += 1
        return capture_step(engine, state["writer"], info)

    return reset, step


def uncaptured_matches(engine, steps: list[StepInfo], taps: list[dict]) -> bool:
    """Whether running `steps` with capture off gives, step by step, the logits tap of the captured run:
    the kernels a plain forward takes (on a GPU, a CUDA graph for decode) do the same arithmetic."""
    engine.reset()
    dev = engine.device
    return all(
        ulps_apart(
            engine.step(
                torch.tensor(info.token_ids, device=dev), torch.tensor(info.positions, device=dev), NullSink()
            ).cpu(),
            step["logits"],
        )
        == 0
        for info, step in zip(steps, taps)
    )


def store_matches(engine, steps: list[StepInfo], taps: list[dict], out_dir: Path) -> bool:
    """Whether capturing `steps` to a store gives, read back, exactly `taps` (the in-memory run's)."""
    store = TapStore.open(capture(engine, steps, out_dir))

    def stored(i: int, name: str, t: torch.Tensor) -> torch.Tensor:  # a decode step keeps the slots it wrote
        slots = store.steps[i].cache_positions
        return t[:, :, slots] if slots is not None and is_cache_tap(name) else t

    return all(
        sorted(store.names(i)) == sorted(step)
        and all(ulps_apart(store.get(i, n), stored(i, n, t)) == 0 for n, t in step.items())
        for i, step in enumerate(taps)
    )


def probe_ids(vocab_size: int, n: int) -> list[int]:
    """A fixed spread of n prompt ids inside the vocabulary (the engine's gather checks no bounds)."""
    return [(7 + 31 * i) % vocab_size for i in range(n)]


def selftest(
    model_dir: Path,
    device: str,
    dtype: str,
    prompt_tokens: int,
    decode_steps: int,
    check_tokens: int = 8,
    check_decode: int = 3,
    progress=print,
) -> SelftestResult:
    from qwen3dbg.reference.hf import HFCandidate

    from .engine import MineCandidate

    engine = MineCandidate(model_dir, dtype, device=device)
    cfg, dev = engine.config, engine.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "emulated" if engine.emulated else "cpu"
    res = SelftestResult(
        str(model_dir), where, dtype_name(engine.dtype), prompt_tokens, decode_steps, check_tokens, check_decode
    )
    ids = probe_ids(cfg.vocab_size, max(prompt_tokens, check_tokens))
    steps = forced_steps(ids[:check_tokens], [(5 + 13 * i) % cfg.vocab_size for i in range(check_decode)])

    progress(f"taps: mine on {where}")
    ours = run_steps(engine, steps, dev)
    twin = None
    if dev.type == "cuda" or engine.emulated:
        progress("taps: mine's CPU twin")
        twin = run_steps(MineCandidate(model_dir, dtype, device="cpu"), steps, torch.device("cpu"))
    progress("taps: HF eager")
    hf_eager = HFCandidate(model_dir, dtype, attn="eager")
    hf_eager.model.to(dev)
    hf = run_steps(hf_eager, steps, dev)
    for name in ours[0]:
        pairs = [(o[name], h[name].to(o[name].dtype)) for o, h in zip(ours, hf)]
        res.taps.append(
            TapRow(
                name,
                None if twin is None else max(ulps_apart(o[name], t[name]) for o, t in zip(ours, twin)),
                min(identical_fraction(a, b) for a, b in pairs),
                max(rel_err(a, b) for a, b in pairs),
            )
        )

    prompt = ids[:prompt_tokens]
    res.weights_bytes = engine.decode_bytes()
    res.bandwidth_gb_s = next((v for k, v in NOMINAL_GB_S.items() if k in res.device), None)
    with tempfile.TemporaryDirectory(prefix="qwen3dbg-selftest-") as tmp:
        res.store_identical = store_matches(engine, steps, ours, Path(tmp) / "check")
        res.uncaptured_identical = uncaptured_matches(engine, steps, ours)
        if engine.emulated:  # the emulator's speed says nothing about a GPU's
            return res
        progress("speed: mine")
        mine = plain_stepper(engine)
        res.speed.append(SpeedRow(f"mine ({dev.type})", *time_steps(*mine, dev, prompt, decode_steps)))
        res.speed.append(
            SpeedRow(
                f"mine ({dev.type}, capture to a store)",
                *time_steps(*capture_stepper(engine, Path(tmp) / "timed"), dev, prompt, decode_steps),
            )
        )
    if engine.use_graph:
        engine.use_graph = False
        res.speed.append(SpeedRow("mine (cuda, no graph)", *time_steps(*mine, dev, prompt, decode_steps)))
        engine.use_graph = True
    progress("speed: HF eager")
    res.speed.append(SpeedRow("hf eager", *time_steps(*hf_stepper(hf_eager), dev, prompt, decode_steps)))
    del hf_eager
    progress("speed: HF sdpa")
    hf_sdpa = HFCandidate(model_dir, dtype, attn="sdpa")
    hf_sdpa.model.to(dev)
    res.speed.append(SpeedRow("hf sdpa", *time_steps(*hf_stepper(hf_sdpa), dev, prompt, decode_steps)))
    return res
