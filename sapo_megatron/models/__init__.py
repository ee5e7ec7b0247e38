"""Model building: Qwen3-MoE-shaped Megatron-Core GPTModels."""

from sapo_megatron.models.builder import build_gpt_model, build_layer_spec, model_config_from_dict
from sapo_megatron.models.config import (
    PRESETS,
    ModelConfig,
    ParallelConfig,
    preset,
    to_transformer_config,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ParallelConfig",
    "build_gpt_model",
    "build_layer_spec",
    "model_config_from_dict",
    "preset",
    "to_transformer_config",
]
