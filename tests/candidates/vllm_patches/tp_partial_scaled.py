"""A row-parallel partial sum scaled on one rank, planted in vLLM's RowParallelLinear (o_proj, down_proj): rank 1's
matmul output is doubled (its partial counted twice) before the all-reduce adds the ranks' partial sums. Rank 0's
partial is right; the sum every rank gets after the all-reduce is wrong alike."""

from vllm.model_executor.layers.linear import RowParallelLinear

original = RowParallelLinear.forward


def forward(self, input_):
    if self.tp_rank != 1:
        return original(self, input_)
    apply = self.quant_method.apply
    self.quant_method.apply = lambda layer, x, bias=None: apply(layer, x, bias) * 2
    try:
        return original(self, input_)
    finally:
        del self.quant_method.apply


RowParallelLinear.forward = forward
