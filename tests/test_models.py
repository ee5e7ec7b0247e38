"""Model building from ModelConfig: layer pattern, norms, shapes, and refused configurations."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sapo_megatron.models import ModelConfig, ParallelConfig, build_gpt_model, preset, to_transformer_config
from sapo_megatron.models.builder import model_config_from_dict
from sapo_megatron.mcore.norms import SequenceParallelRMSNorm


def test_layer_pattern_and_qwen3_shape(single_rank_parallel):
    cfg = ModelConfig(num_hidden_layers=4, first_k_dense=1, mlp_only_layers=[3], head_dim=24)
    model = build_gpt_model(cfg, ParallelConfig())
    layers = model.decoder.layers
    kinds = [type(layer.mlp).__name__ for layer in layers]
    assert kinds == ["MLP", "MoELayer", "MoELayer", "MLP"]
    moe = layers[1].mlp
    assert moe.router.weight.shape == (cfg.num_experts, cfg.hidden_size)
    assert len(moe.experts.local_experts) == cfg.num_experts
    # SwiGLU experts: fc1 holds [gate; up].
    assert moe.experts.local_experts[0].linear_fc1.weight.shape == (2 * cfg.moe_intermediate_size, cfg.hidden_size)
    attn = layers[0].self_attention
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = 2 * cfg.num_key_value_heads * cfg.head_dim
    assert attn.linear_qkv.weight.shape == (q_out + kv_out, cfg.hidden_size)
    assert isinstance(attn.q_layernorm, SequenceParallelRMSNorm) and attn.q_layernorm.weight.shape == (24,)
    assert isinstance(layers[0].input_layernorm, SequenceParallelRMSNorm)
    assert isinstance(model.decoder.final_layernorm, SequenceParallelRMSNorm)
    assert model.output_layer.weight is not model.embedding.word_embeddings.weight
    assert not any(p.sequence_parallel for p in model.decoder.final_layernorm.parameters())


def test_forward_shape_and_finite(single_rank_parallel):
    cfg = ModelConfig()
    model = build_gpt_model(cfg, ParallelConfig())
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)[None, None]
    logits = model(ids, torch.arange(5).expand(2, 5), mask)
    assert logits.shape == (2, 5, cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_transformer_config_mapping():
    cfg = preset("qwen3-30b-a3b")
    tc = to_transformer_config(cfg, ParallelConfig(tensor_model_parallel_size=4, expert_model_parallel_size=8), on_cpu=False)
    assert tc.num_moe_experts == 128 and tc.moe_router_topk == 8
    assert tc.num_query_groups == 4 and tc.kv_channels == 128
    assert tc.moe_router_pre_softmax is False and tc.qk_layernorm
    assert tc.sequence_parallel, "MoE + TP needs sequence parallelism; it defaults on for TP>1"
    assert tc.calculate_per_token_loss, "the step's normalisation relies on the per-token path"
    # Grouped-GEMM experts are Transformer Engine's; without TE a GPU gets SequentialMLP.
    has_te = importlib.util.find_spec("transformer_engine") is not None
    assert tc.moe_token_dispatcher_type == "alltoall" and tc.moe_grouped_gemm == has_te
    assert tc.bf16 and tc.params_dtype == torch.bfloat16
    cpu = to_transformer_config(ModelConfig(), ParallelConfig(), on_cpu=True)
    assert cpu.moe_token_dispatcher_type == "allgather" and not cpu.moe_grouped_gemm


def test_megatron_passthrough_and_unknown_keys():
    tc = to_transformer_config(ModelConfig(megatron={"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}), ParallelConfig(), on_cpu=True)
    assert tc.recompute_granularity == "full"
    with pytest.raises(ValueError, match="not_a_field"):
        to_transformer_config(ModelConfig(megatron={"not_a_field": 1}), ParallelConfig(), on_cpu=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"params_dtype": "float8"}, "params_dtype"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "parallel,match",
    [
        (ParallelConfig(tensor_model_parallel_size=3), "num_attention_heads"),
        (ParallelConfig(pipeline_model_parallel_size=3), "num_hidden_layers"),
        (ParallelConfig(expert_model_parallel_size=3), "num_experts"),
    ],
)
def test_parallel_sizes_must_divide_the_model(parallel, match):
    with pytest.raises(ValueError, match=match):
        to_transformer_config(ModelConfig(), parallel, on_cpu=True)


def test_bad_parallel_and_dict_config():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="hiden_size"):
        model_config_from_dict({"hiden_size": 8})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("qwen9")
