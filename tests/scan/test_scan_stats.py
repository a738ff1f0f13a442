"""The fused statistics kernel against float64 numpy, for every element type it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3dbg.scan.stats import Accumulator, array_stats, chunk_elements, histogram_min_elements


def _reference(x: np.ndarray) -> dict:
    f = x[np.isfinite(x)]
    return {
        "min": f.min(),
        "max": f.max(),
        "mean": f.mean(),
        "std": f.std(),
        "n_nan": int(np.isnan(x).sum()),
        "n_posinf": int((x == np.inf).sum()),
        "n_neginf": int((x == -np.inf).sum()),
        "n_zero": int((x == 0).sum()),
    }


def _as_kernel_input(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    return (t.view(torch.int16).numpy(), "bfloat16") if t.dtype == torch.bfloat16 else (t.numpy(), None)


def _check(t: torch.Tensor):
    x = t.double().numpy()
    s = array_stats(*_as_kernel_input(t))
    ref = _reference(x)
    # sums run in float64 over n terms: relative error at most about n * eps64
    rtol = x.size * np.finfo(np.float64).eps
    assert (s.min, s.max) == (ref["min"], ref["max"])
    assert (s.n_nan, s.n_posinf, s.n_neginf, s.n_zero) == (
        ref["n_nan"],
        ref["n_posinf"],
        ref["n_neginf"],
        ref["n_zero"],
    )
    assert s.mean == pytest.approx(ref["mean"], rel=rtol, abs=rtol * ref["std"])
    assert s.std == pytest.approx(ref["std"], rel=rtol)
    assert s.numel == x.size


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _sizes():
    """A sweep-path size (chunks plus a ragged tail) and a histogram-path size (16-bit types only)."""
    return {"sweep": 3 * chunk_elements() + 77, "histogram": histogram_min_elements() + 77}


@pytest.mark.parametrize("path", ["sweep", "histogram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_tensor_matches_float64_reference(dtype, path):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(_sizes()[path], generator=g) * 0.02 + 0.5).to(dtype)
    t[100:110] = 0
    t[200] = -0.0
    _check(t)


@pytest.mark.parametrize("path", ["sweep", "histogram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_infinities_are_counted_and_left_out_of_the_moments(dtype, path):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(_sizes()[path], generator=g).to(dtype)
    t[3], t[chunk_elements() + 9], t[-1], t[-2] = float("nan"), float("inf"), float("-inf"), float("nan")
    _check(t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("repeat", [1, 40])  # 40 x 65536 values reach the histogram path
def test_every_16_bit_pattern(dtype, repeat):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).repeat(repeat)
    t = bits.view(dtype)
    _check(t)  # holds NaNs: the spec path
    finite = t[torch.isfinite(t)]
    _check(finite)  # all finite: the fast path, subnormals and signed zeros included


def test_windowed_feeding_gives_the_same_bits_as_one_pass():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5 * chunk_elements() + 123, generator=g).numpy()
    whole = array_stats(a)
    acc = Accumulator("float32", a[:1])
    step = 2 * chunk_elements()
    for i in range(0, a.size, step):
        part = a[i : i + step]
        acc.add(part.ctypes.data, part.size)
    assert acc.result() == whole


def test_all_nan_and_empty_tensors_have_no_moments():
    s = array_stats(np.full(1000, np.nan, dtype=np.float32))
    assert s.n_nan == 1000 and np.isnan(s.mean) and np.isnan(s.absmax)
    e = array_stats(np.zeros(0, dtype=np.float32))
    assert e.numel == 0 and e.nonfinite == 0
