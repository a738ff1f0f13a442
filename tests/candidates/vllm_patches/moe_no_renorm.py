"""A MoE routing bug planted in vLLM's CPU router: the top-k weights are softmax probabilities over all
experts, never renormalised over the k chosen, whatever norm_topk_prob says."""

from vllm.model_executor.layers.fused_moe.router import cpu_router

original = cpu_router._softmax_topk
cpu_router._softmax_topk = lambda logits, top_k, renormalize: original(logits, top_k, False)
