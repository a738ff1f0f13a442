"""The numerics switches of `mine`: where it rounds, each switch answering one question a porter asks. The
defaults round where transformers does; flipping one (`--cand mine:rmsnorm=fused`) shows what it does to every tap."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qwen3dbg.util.errors import UserError

# name -> (choices, the porter's question it answers). The compute dtype is the candidate's dtype:
# "my engine computes in fp16 / bf16 / fp32: how far from the reference does that alone take me?"
SWITCHES: dict[str, tuple[tuple[str, ...], str]] = {
    "rmsnorm": (
        ("hf", "fused"),
        "My RMSNorm multiplies by the weight in fp32 and rounds once (fused); transformers normalises in "
        "fp32, rounds, then multiplies by the weight in the compute dtype (hf). Which taps move, and by how "
        "much where the weight is large (k_norm ~100)?",
    ),
    "scores": (
        ("compute", "fp32"),
        "My attention keeps q.k and the scaled scores in fp32 (fp32, as fused kernels do); transformers' "
        "eager path rounds both to the compute dtype (compute). Does that explain my attention differences?",
    ),
    "accum": (
        ("fp32", "compute", "split"),
        "My matrix products accumulate in fp32 (fp32), or in one running sum rounded to the compute dtype "
        "after every add (compute, a plain loop accumulating in bf16), or in fp32 per lane with the 32 lane "
        "partials rounded and summed in the compute dtype (split, as a split-K GEMM with bf16 partials). Is "
        "my accumulation the divergence?",
    ),
}

_CODES = {"rmsnorm": {"hf": 0, "fused": 1}, "accum": {"fp32": 0, "compute": 1, "split": 2}}


@dataclass(frozen=True)
class MineNumerics:
    rmsnorm: str = "hf"
    scores: str = "compute"
    accum: str = "fp32"

    def __post_init__(self):
        for name, value in asdict(self).items():
            choices, _ = SWITCHES[name]
            if value not in choices:
                raise UserError(f"mine option {name}={value!r}: choose one of {', '.join(choices)}")

    @property
    def rmsnorm_code(self) -> int:
        return _CODES["rmsnorm"][self.rmsnorm]

    @property
    def accum_code(self) -> int:
        return _CODES["accum"][self.accum]

    @property
    def round_scores(self) -> bool:
        return self.scores == "compute"

    def to_dict(self) -> dict:
        return asdict(self)
