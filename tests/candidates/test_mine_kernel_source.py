"""A rule of kernels.cu that neither the twin nor the emulator can see, read from the source: before
wait_for_inputs() a kernel touches nothing but its own weight row."""

from __future__ import annotations

import re
from pathlib import Path

import qwen3dbg.candidates.mine as mine

KERNELS = Path(mine.__file__).with_name("csrc") / "kernels.cu"
KERNEL_HEAD = re.compile(r"__global__\s[^{;]*?(\w+)\s*\(([^()]*)\)\s*\{")


# With programmatic dependent launch a kernel starts while the one before it still runs, so before it calls
# wait_for_inputs() it may touch nothing but its own weight row (through prefetch_row). A read of an activation
# there is a race that only shows, now and then, on an sm_90 GPU.
def early_uses(source: str) -> dict[str, list[str]]:
    """{kernel: the pointer-bearing parameters it uses before wait_for_inputs()} of every __global__
    function in `source`, its weight prefetches left out."""
    found = {}
    for head in KERNEL_HEAD.finditer(source):
        depth, at = 1, head.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[at], 0)
            at += 1
        early, wait, _ = source[head.end() : at].partition("wait_for_inputs();")
        assert wait, f"{head.group(1)} never calls wait_for_inputs()"
        early = re.sub(r"prefetch_row\([^;]*\);", "", early)
        params = [re.findall(r"\w+", p) for p in head.group(2).split(",") if "*" in p or "QKRope" in p]
        found[head.group(1)] = [p[-1] for p in params if re.search(rf"\b{p[-1]}\b", early)]
    return found


def test_every_kernel_touches_only_weights_before_it_waits_for_its_inputs():
    found = early_uses(KERNELS.read_text())
    assert {"embed_k", "linear_k", "norm_linear_k", "attention_k", "moe_combine_k"} <= found.keys()
    assert {name: used for name, used in found.items() if used} == {}


def test_the_rule_catches_a_read_before_the_wait():
    planted = """template <class T> __global__ void scale_k(const T* x, const T* w, T* y, int n) {
  const float first = to_f(x[0]);
  prefetch_row(w, n);
  wait_for_inputs();
  y[0] = from_f<T>(first);
}"""
    assert early_uses(planted) == {"scale_k": ["x"]}
