"""Qwen3, dense (``Qwen3ForCausalLM``): Qwen3 attention and a SwiGLU MLP in every layer."""

from __future__ import annotations

from sapo_megatron.checkpoint.models.common import ArchMapping, model_config
from sapo_megatron.models import ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    return model_config(hf, num_experts=0, qk_layernorm=True)


# Exactly the shared Qwen3 layout (ArchMapping's defaults).
MAPPING = ArchMapping("Qwen3ForCausalLM", config_from_hf)
