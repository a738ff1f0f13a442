"""Each CUDA kernel of mine, run on the CPU by the emulator (cuda_emu.h), against the twin's op on the same
inputs, bit for bit. One case per row of the table, in the manner of llama.cpp's test-backend-ops: a case
declares its op and parameters, which name it in its id and in every failure line; one runner runs them all."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from qwen3dbg.util.dtypes import dtype_name

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
#: the accumulation modes of numerics.py, as the kernels take them
FP32, COMPUTE, SPLIT = 0, 1, 2
EPS = 1e-6


@dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype = BF16
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return " ".join([self.op, dtype_name(self.dtype), *(f"{k}={v}" for k, v in self.params.items())])


def case(op: str, dtype: torch.dtype = BF16, **params) -> Case:
    return Case(op, dtype, params)


CASES = [
    case("embed", n=5, h=64),
    case("embed", F32, n=3, h=24),
    case("rmsnorm", n=3, dim=64, mode=0),
    case("rmsnorm", n=2, dim=136, mode=1),
    case("rmsnorm", F16, n=2, dim=64, mode=0),
    case("rmsnorm", F32, n=2, dim=64, mode=0),
    # one token runs linear_k<T, 1>; more run blocks of 8 tokens, the last one partial
    case("linear", n=1, k=264, m=5, accum=FP32),
    case("linear", n=9, k=264, m=5, accum=FP32, resid=True),
    case("linear", n=3, k=64, m=7, accum=COMPUTE),
    case("linear", n=3, k=520, m=3, accum=SPLIT),
    case("linear", F16, n=2, k=64, m=4, accum=SPLIT, resid=True),
    case("linear", F32, n=9, k=72, m=3, accum=FP32),
    # one token without its normed rows kept is one fused kernel; otherwise rmsnorm, then linear
    case("norm_linear", n=1, k=128, m=6, mode=0, accum=FP32),
    case("norm_linear", n=1, k=128, m=6, mode=1, accum=COMPUTE),
    case("norm_linear", n=3, k=64, m=5, mode=0, accum=FP32),
    case("silu_mul", n=3, inter=40),
    case("silu_mul", F16, n=2, inter=16),
    case("silu_linear", n=1, inter=72, m=5, accum=FP32, resid=True),
    case("silu_linear", n=3, inter=64, m=4, accum=SPLIT),
    # q/k norm + RoPE, then attention over the cache: a step of several tokens runs both kernels, one
    # token a sequence the fused one. `start`: the first position, whose earlier slots hold past tokens.
    case("attention", batch=2, tokens=3, heads=4, kv_heads=2, head_dim=64, start=0),
    case("attention", batch=1, tokens=2, heads=4, kv_heads=1, head_dim=64, start=7, round_scores=False),
    case("attention", batch=2, tokens=1, heads=4, kv_heads=2, head_dim=64, start=9),
    case("attention", batch=1, tokens=1, heads=2, kv_heads=1, head_dim=128, start=5, accum=COMPUTE, mode=1),
    case("attention", F16, batch=1, tokens=2, heads=2, kv_heads=2, head_dim=64, start=3, fill=0),
    case("attention", F32, batch=1, tokens=1, heads=4, kv_heads=2, head_dim=64, start=6),
    case("route", n=3, experts=8, k=2, norm=True),
    case("route", n=2, experts=40, k=4, norm=False),
    case("route", F32, n=2, experts=8, k=8, norm=True),
    case("moe_linear", n=3, topk=2, experts=4, inp=64, out=5, per_slot=False, accum=FP32),
    case("moe_linear", n=2, topk=2, experts=4, inp=64, out=3, per_slot=True, accum=COMPUTE),
    case("moe_combine", n=3, topk=2, h=24, resid=True),
    case("moe_combine", F16, n=2, topk=3, h=16, resid=False),
]


@pytest.fixture(scope="module")
def builds():
    """(twin, emulated kernels): the two builds the engine loads for `cpu` and `emulated`."""
    from qwen3dbg.candidates.mine.build import load

    return load(), load(emulated=True)


# ---- each op: its inputs from a generator, then a run that calls one build and returns what it wrote ----


def _randn(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def _residual(g, c: Case, n: int, m: int) -> tuple[torch.Tensor, bool]:
    if c.params.get("resid"):
        return _randn(g, n, m, dtype=c.dtype), True
    return torch.empty(0, dtype=c.dtype), False


def embed(g, c):
    p = c.params
    ids, table = torch.randint(0, 16, (p["n"],), generator=g), _randn(g, 16, p["h"], dtype=c.dtype)

    def run(ops):
        out = torch.zeros(p["n"], p["h"], dtype=c.dtype)
        ops.embed(ids, table, out)
        return {"out": out}

    return run


def rmsnorm(g, c):
    p = c.params
    x, w = _randn(g, p["n"], p["dim"], dtype=c.dtype), (1 + _randn(g, p["dim"], dtype=F32) / 4).to(c.dtype)

    def run(ops):
        out = torch.zeros_like(x)
        ops.rmsnorm(x, w, out, EPS, p["mode"])
        return {"out": out}

    return run


def linear(g, c):
    p = c.params
    x, w = _randn(g, p["n"], p["k"], dtype=c.dtype), _randn(g, p["m"], p["k"], dtype=c.dtype)
    resid_in, resid = _residual(g, c, p["n"], p["m"])

    def run(ops):
        y = torch.zeros(p["n"], p["m"], dtype=c.dtype)
        resid_out = torch.zeros_like(resid_in)
        ops.linear(x, w, y, p["accum"], resid_in, resid_out)
        return {"y": y, "resid_out": resid_out} if resid else {"y": y}

    return run


def norm_linear(g, c):
    p = c.params
    x, w = _randn(g, p["n"], p["k"], dtype=c.dtype), _randn(g, p["m"], p["k"], dtype=c.dtype)
    norm_w = (1 + _randn(g, p["k"], dtype=F32) / 4).to(c.dtype)
    keep_normed = p["n"] > 1  # as the engine: one token's normed rows are not kept unless a tap wants them

    def run(ops):
        y = torch.zeros(p["n"], p["m"], dtype=c.dtype)
        normed = torch.zeros_like(x) if keep_normed else torch.empty(0, dtype=c.dtype)
        ops.norm_linear(x, norm_w, w, y, normed, EPS, p["mode"], p["accum"])
        return {"y": y, "normed": normed}

    return run


def silu_mul(g, c):
    p = c.params
    gate_up = _randn(g, p["n"], 2 * p["inter"], dtype=c.dtype)

    def run(ops):
        out = torch.zeros(p["n"], p["inter"], dtype=c.dtype)
        ops.silu_mul(gate_up, out)
        return {"out": out}

    return run


def silu_linear(g, c):
    p = c.params
    gate_up, w = _randn(g, p["n"], 2 * p["inter"], dtype=c.dtype), _randn(g, p["m"], p["inter"], dtype=c.dtype)
    resid_in, resid = _residual(g, c, p["n"], p["m"])
    keep_act = p["n"] > 1

    def run(ops):
        y = torch.zeros(p["n"], p["m"], dtype=c.dtype)
        act = torch.zeros(p["n"], p["inter"], dtype=c.dtype) if keep_act else torch.empty(0, dtype=c.dtype)
        resid_out = torch.zeros_like(resid_in)
        ops.silu_linear(gate_up, w, y, act, p["accum"], resid_in, resid_out)
        return {"y": y, "act": act, **({"resid_out": resid_out} if resid else {})}

    return run


def attention(g, c):
    p = c.params
    B, T, nH, nKV, D, start = p["batch"], p["tokens"], p["heads"], p["kv_heads"], p["head_dim"], p["start"]
    N, layers, slots = B * T, 2, start + T + 2
    qkv = _randn(g, N, (nH + 2 * nKV) * D, dtype=c.dtype)
    qw, kw = ((1 + _randn(g, D, dtype=F32) / 4).to(c.dtype) for _ in range(2))
    # the earlier slots hold what past steps wrote; this step's go to slots start .. start + T - 1
    k_cache, v_cache = (_randn(g, layers, B, nKV, slots, D, dtype=c.dtype) for _ in range(2))
    pos = (start + torch.arange(T, dtype=torch.int32)).repeat(B)
    fill = p.get("fill", slots)

    def run(ops):
        cos, sin = torch.empty(slots, D, dtype=c.dtype), torch.empty(slots, D, dtype=c.dtype)
        ops.rope_table(cos, sin, 10000.0)
        out = {
            "q_norm": torch.zeros(N, nH, D, dtype=c.dtype),
            "k_norm": torch.zeros(N, nKV, D, dtype=c.dtype),
            "q_rope": torch.zeros(N, nH, D, dtype=c.dtype),
            "k_rope": torch.zeros(N, nKV, D, dtype=c.dtype),
            "k_cache": k_cache.clone(),
            "v_cache": v_cache.clone(),
            "scores": torch.zeros(B, nH, T, slots),
            "probs": torch.zeros(B, nH, T, slots, dtype=c.dtype),
            "out": torch.zeros(N, nH * D, dtype=c.dtype),
        }
        ops.attention(
            qkv,
            qw,
            kw,
            cos,
            sin,
            pos,
            *out.values(),
            B,
            1,
            fill,
            D**-0.5,
            p.get("round_scores", True),
            p.get("accum", FP32),
            EPS,
            p.get("mode", 0),
        )
        return out

    return run


def route(g, c):
    p = c.params
    logits = _randn(g, p["n"], p["experts"], dtype=c.dtype)

    def run(ops):
        ids, weights = torch.zeros(p["n"], p["k"], dtype=torch.int64), torch.zeros(p["n"], p["k"], dtype=c.dtype)
        ops.route(logits, ids, weights, p["norm"])
        return {"ids": ids, "weights": weights}

    return run


def _expert_ids(g, n: int, topk: int, experts: int) -> torch.Tensor:
    """[n, topk] distinct experts per token, as routing picks them."""
    return torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(n)])


def moe_linear(g, c):
    p = c.params
    n, topk = p["n"], p["topk"]
    x = _randn(g, n * topk if p["per_slot"] else n, p["inp"], dtype=c.dtype)
    ids, w = _expert_ids(g, n, topk, p["experts"]), _randn(g, p["experts"], p["out"], p["inp"], dtype=c.dtype)

    def run(ops):
        y = torch.zeros(n * topk, p["out"], dtype=c.dtype)
        ops.moe_linear(x, ids, w, y, p["per_slot"], p["accum"])
        return {"y": y}

    return run


def moe_combine(g, c):
    p = c.params
    n, topk, h = p["n"], p["topk"], p["h"]
    y, ids = _randn(g, n * topk, h, dtype=c.dtype), _expert_ids(g, n, topk, 8)
    weights = torch.rand(n, topk, generator=g).to(c.dtype)
    resid_in, resid = _residual(g, c, n, h)

    def run(ops):
        out, resid_out = torch.zeros(n, h, dtype=c.dtype), torch.zeros_like(resid_in)
        ops.moe_combine(y, ids, weights, out, resid_in, resid_out)
        return {"out": out, **({"resid_out": resid_out} if resid else {})}

    return run


OPS = {
    f.__name__: f
    for f in (embed, rmsnorm, linear, norm_linear, silu_mul, silu_linear, attention, route, moe_linear, moe_combine)
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that NaNs compare equal and -0 differs from +0."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def test_every_op_of_the_table_is_named_and_every_op_has_a_case():
    assert {c.op for c in CASES} == OPS.keys()


@pytest.mark.parametrize("c", CASES, ids=str)
def test_emulated_kernel_gives_the_twins_bits(c, builds):
    twin, kernels = builds
    run = OPS[c.op](torch.Generator().manual_seed(0), c)
    want, got = run(twin), run(kernels)
    for name in want:
        differ = _bits(got[name]) != _bits(want[name])
        assert not differ.any(), (
            f"{c}: {name} differs in {int(differ.sum())} of {differ.numel()} elements, "
            f"first at {tuple(differ.nonzero()[0].tolist())}"
        )
