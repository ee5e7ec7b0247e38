"""Build a Megatron-Core ``GPTModel`` with MoE layers from a :class:`ModelConfig`.

The layer spec comes from Megatron-Core's own ``get_gpt_decoder_block_spec`` (dense and MoE
layers placed by ``moe_layer_freq``; only this pipeline stage's layers are built). With
Transformer Engine importable and CUDA present we use the TE spec unchanged. Otherwise we use
the local spec with its norms swapped for an SP-capable RMSNorm
(:func:`sapo_megatron.mcore.norms.with_sp_norms`), the one change needed for MoE + tensor
parallelism (which requires sequence parallelism) to train on CPU.

Must be called after ``sapo_megatron.parallel.initialize_model_parallel``.
"""

from __future__ import annotations

import dataclasses

import torch

from sapo_megatron.mcore.norms import with_sp_norms
from sapo_megatron.models.config import ModelConfig, ParallelConfig, to_transformer_config, use_transformer_engine


def build_layer_spec(transformer_config, *, vp_stage: int | None = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = use_transformer_engine()
    spec = get_gpt_decoder_block_spec(
        transformer_config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage
    )
    return spec if te else with_sp_norms(spec, transformer_config.qk_layernorm)


def build_gpt_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    vp_stage: int | None = None,
    transformer_config=None,
):
    """Build this rank's part of the model (one virtual stage when ``vp_stage`` is given)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    on_cpu = not torch.cuda.is_available()
    config = transformer_config or to_transformer_config(model_cfg, parallel_cfg, on_cpu=on_cpu)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(config, vp_stage=vp_stage),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rope_theta),
        vp_stage=vp_stage,
    )
    if not on_cpu:
        model.cuda(torch.cuda.current_device())
    return model


def model_config_from_dict(data: dict) -> ModelConfig:
    """``ModelConfig`` from a plain dict, refusing unknown keys by name."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
    return ModelConfig(**data)
