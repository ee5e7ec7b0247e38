"""Qwen3, dense (``Qwen3ForCausalLM``): Qwen3 attention and a SwiGLU MLP in every layer."""

from __future__ import annotations

from sapo_megatron.checkpoint.models.common import (
    DENSE_MLP,
    EMBEDDING,
    FINAL,
    OUTPUT,
    ArchMapping,
    attention,
    common_config,
)
from sapo_megatron.models import ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    return ModelConfig(**common_config(hf), num_experts=0, qk_layernorm=True)


MAPPING = ArchMapping(
    "Qwen3ForCausalLM",
    config_from_hf,
    embedding=EMBEDDING,
    layer=attention(qk_norm=True),
    dense_mlp=DENSE_MLP,
    final=FINAL,
    output=OUTPUT,
)
