"""Mixtral (``MixtralForCausalLM``, 8x7B / 8x22B): every layer MoE, no q/k norm.

HF names the experts ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down) and the router
``block_sparse_moe.gate``; its ``intermediate_size`` is the per-expert size.
"""

from __future__ import annotations

from sapo_megatron.checkpoint.models.common import (
    HF_LAYER,
    MCORE_LAYER,
    ArchMapping,
    attention,
    glu,
    model_config,
    routed_experts,
    router,
)
from sapo_megatron.models import ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") is not None:
        raise ValueError(
            f"Mixtral sliding_window={hf['sliding_window']} is not supported by the model builder "
            f"(Mixtral-8x7B/8x22B have null)"
        )
    # Mixtral's intermediate_size is the per-expert size; every layer is MoE.
    return model_config(hf, **routed_experts(hf, "num_local_experts", size="intermediate_size"), qk_layernorm=False)


MAPPING = ArchMapping(
    "MixtralForCausalLM",
    config_from_hf,
    layer=attention(qk_norm=False),
    dense_mlp=(),
    moe=(router("block_sparse_moe.gate.weight"),),
    # w1 = gate, w3 = up, w2 = down.
    expert=glu(
        MCORE_LAYER + "mlp.experts.local_experts.{e}.", HF_LAYER + "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"), "FE"
    ),
)
