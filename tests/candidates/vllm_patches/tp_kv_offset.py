"""A rank that reads the wrong kv-head offset, planted in vLLM's loading of the fused qkv_proj: each rank should
copy kv heads `tp_rank // num_kv_head_replicas` of the checkpoint's k_proj and v_proj; this offset forgets the
rank, so every rank loads the first kv heads. Right on rank 0 (and without tensor parallelism), wrong on rank 1."""

from vllm.model_executor.parameter import _ColumnvLLMParameter

original = _ColumnvLLMParameter.load_qkv_weight


def load_qkv_weight(self, loaded_weight, **kwargs):
    if kwargs["shard_id"] == "q":
        return original(self, loaded_weight, **kwargs)
    size = kwargs["shard_size"]
    self.data.narrow(self.output_dim, kwargs["shard_offset"], size).copy_(
        loaded_weight.narrow(self.output_dim, 0, size)
    )


_ColumnvLLMParameter.load_qkv_weight = load_qkv_weight
