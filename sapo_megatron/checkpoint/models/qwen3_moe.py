"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B, Qwen3-235B-A22B).

Qwen3 attention (GQA, q/k RMSNorm, head_dim independent of hidden/heads) and a softmax top-k
router over ``num_experts`` SwiGLU experts; ``mlp_only_layers`` and ``decoder_sparse_step``
place dense layers. ``norm_topk_prob=True`` (the released models) is Megatron's default
(softmax over the top-k logits, ``moe_router_pre_softmax=False``).
"""

from __future__ import annotations

from sapo_megatron.checkpoint.models.common import EXPERT_MLP, ArchMapping, model_config, routed_experts, router
from sapo_megatron.models import ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    step = hf.get("decoder_sparse_step", 1)
    layers = hf["num_hidden_layers"]
    # HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    megatron = {}
    if not hf.get("norm_topk_prob", True):
        # Softmax over all experts, no renormalisation of the top-k.
        megatron["moe_router_pre_softmax"] = True
    return model_config(
        hf, **routed_experts(hf, ("num_experts", "num_local_experts")), mlp_only_layers=sorted(dense),
        qk_layernorm=True, megatron=megatron,
    )


# Qwen3 attention and dense MLP (the defaults); the router is HF's `mlp.gate`.
MAPPING = ArchMapping("Qwen3MoeForCausalLM", config_from_hf, moe=(router("mlp.gate.weight"),), expert=EXPERT_MLP)
