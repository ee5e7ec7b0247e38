"""The DeepSeek-V3 MoE block, as dots.llm1 ships it (``Dots1ForCausalLM``).

dots.llm1 is DeepSeek-V3's MoE block on Qwen3 attention: dense first layers
(``first_k_dense_replace``), a shared expert, a sigmoid router with an expert score-correction
bias (``e_score_correction_bias`` -> Megatron's ``router.expert_bias``), group-limited top-k
(``n_group`` / ``topk_group``) and routed scaling. DeepSeek-V3 itself also needs multi-latent
attention, which the builder does not make (see ``REFUSED`` in :mod:`sapo_megatron.checkpoint.models`).
"""

from __future__ import annotations

from typing import Any

from sapo_megatron.checkpoint.models.common import (
    EXPERT_MLP,
    HF_LAYER,
    MCORE_LAYER,
    ArchMapping,
    Rule,
    glu,
    model_config,
    routed_experts,
    router,
)
from sapo_megatron.models import ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    if not hf.get("norm_topk_prob", False) and hf["num_experts_per_tok"] > 1:
        raise ValueError(
            "norm_topk_prob=False with a sigmoid router is not supported: Megatron-Core always "
            "renormalises the top-k sigmoid scores"
        )
    megatron: dict[str, Any] = dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )
    if hf.get("n_group", 1) > 1:
        megatron.update(moe_router_num_groups=hf["n_group"], moe_router_group_topk=hf["topk_group"])
    if hf.get("n_shared_experts"):
        megatron["moe_shared_expert_intermediate_size"] = hf["n_shared_experts"] * hf["moe_intermediate_size"]
    return model_config(
        hf, **routed_experts(hf, "n_routed_experts"), first_k_dense=hf.get("first_k_dense_replace", 0),
        qk_layernorm=True, megatron=megatron,
    )


# Qwen3 attention and dense MLP (the defaults) around the DeepSeek-V3 MoE block.
MAPPING = ArchMapping(
    "Dots1ForCausalLM",
    config_from_hf,
    moe=(
        router("mlp.gate.weight"),
        Rule(MCORE_LAYER + "mlp.router.expert_bias", (HF_LAYER + "mlp.gate.e_score_correction_bias",), hf_shapes=(("E",),)),
    ),
    expert=EXPERT_MLP,
    shared_expert=glu(MCORE_LAYER + "mlp.shared_experts.", HF_LAYER + "mlp.shared_experts.", ffn="FS"),
)
