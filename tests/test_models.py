"""Model building from ModelConfig: layer pattern, norms, shapes, refused configurations, and the
built model's forward and gradients against an independent float64 forward written out here."""

from __future__ import annotations

import dataclasses
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


# --------------------------------------------------------------------------- float64 reference
# The maths of a Qwen3-MoE decoder, written from the architecture (not from Megatron's code),
# reading the parameters of the built model by their Megatron names.


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x_BSHD, theta):
    d = x_BSHD.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x_BSHD.shape[1], dtype=torch.float64)[:, None] * inv[None]  # [S, D/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
    x1, x2 = x_BSHD.chunk(2, -1)
    return x_BSHD * cos + torch.cat([-x2, x1], -1) * sin


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.T).chunk(2, -1)  # Megatron's linear_fc1 holds [gate; up]
    return (torch.nn.functional.silu(gate) * up) @ fc2.T


def reference_forward(params: dict, cfg: ModelConfig, ids):
    """(logits [B, S, V], per-MoE-layer (top-k expert ids [B*S, K], gate weights [B*S, E]))."""
    B, S = ids.shape
    nh, ng, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_channels, cfg.rms_norm_eps
    x = params["embedding.word_embeddings.weight"][ids]
    routing = []
    for i in range(cfg.num_hidden_layers):
        p = lambda name: params[f"decoder.layers.{i}.{name}"]  # noqa: E731
        h = _rms(x, p("input_layernorm.weight"), eps)
        # Fused QKV, per query group: [q x (nh / ng), k, v], each head_dim rows.
        qkv = (h @ p("self_attention.linear_qkv.weight").T).view(B, S, ng, nh // ng + 2, d)
        q = qkv[..., : nh // ng, :].reshape(B, S, nh, d)
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        if cfg.qk_layernorm:
            q = _rms(q, p("self_attention.q_layernorm.weight"), eps)
            k = _rms(k, p("self_attention.k_layernorm.weight"), eps)
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
        k, v = (t.repeat_interleave(nh // ng, dim=2) for t in (k, v))  # GQA
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, nh * d)
        x = x + attn @ p("self_attention.linear_proj.weight").T
        h = _rms(x, p("pre_mlp_layernorm.weight"), eps)
        if cfg.moe_layer_pattern()[i]:
            flat = h.reshape(B * S, -1)
            # Top-k of the router logits, softmax over the chosen k (norm_topk_prob=True).
            top_logits, top_idx = (flat @ p("mlp.router.weight").T).topk(cfg.num_experts_per_tok, dim=-1)
            gates = torch.zeros(B * S, cfg.num_experts, dtype=flat.dtype).scatter(1, top_idx, top_logits.softmax(-1))
            out = sum(
                gates[:, e : e + 1] * _swiglu(flat, p(f"mlp.experts.local_experts.{e}.linear_fc1.weight"),
                                              p(f"mlp.experts.local_experts.{e}.linear_fc2.weight"))
                for e in range(cfg.num_experts)
            )
            routing.append((top_idx, gates))
            x = x + out.reshape(B, S, -1)
        else:
            x = x + _swiglu(h, p("mlp.linear_fc1.weight"), p("mlp.linear_fc2.weight"))
    x = _rms(x, params["decoder.final_layernorm.weight"], eps)
    return x @ params["output_layer.weight"].T, routing


# Dense layer 0, MoE layer 1; head_dim 24 != hidden / heads = 16; GQA 2:1; 6 experts, top-3.
REF_CFG = ModelConfig(num_hidden_layers=2, first_k_dense=1, head_dim=24, num_experts=6, num_experts_per_tok=3)


@pytest.fixture(scope="module")
def randomised_model(single_rank_parallel):
    """The built model with every weight drawn again, large enough that every path matters
    (norm weights away from 1, router logits spread over experts)."""
    model = build_gpt_model(REF_CFG, ParallelConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "layernorm" in name else 0.15 * noise)
    ids = torch.randint(0, REF_CFG.vocab_size, (2, 7), generator=gen)
    return model, ids


def _megatron_forward(model, ids):
    B, S = ids.shape
    seen = []
    hooks = [layer.mlp.router.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    try:
        logits = model(ids, torch.arange(S).expand(B, S), torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None])
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def _to_bs(t_SB, B, S):
    """Router rows are sequence-major ([S, B] flattened); the reference's are batch-major."""
    return t_SB.reshape(S, B, -1).transpose(0, 1).reshape(B * S, -1)


# float32 (Megatron) against float64 (reference) through two layers: rounding moves logits of
# magnitude ~1-5 by ~1e-6; 1e-4 is far above that and far below any modelling error (a missing
# q/k norm, wrong RoPE halves, swapped gate/up, a pre-softmax router), each of which moves the
# logits by > 1e-2 (test_reference_tolerance_is_not_vacuous).
LOGITS_ATOL = 1e-4


def test_forward_matches_float64_reference_and_routes_the_same_experts(randomised_model):
    model, ids = randomised_model
    B, S = ids.shape
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits, seen = _megatron_forward(model, ids)
    ref, routing = reference_forward(params, REF_CFG, ids)
    assert logits.shape == (B, S, REF_CFG.vocab_size) and torch.isfinite(logits).all()
    assert ref.std() > 0.5, "vacuous comparison: logits nearly constant"
    diff = (logits.double() - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max abs logits diff {diff:.2e}"
    ((probs, routing_map),), ((top_idx, gates),) = seen, routing
    # Same experts per token (order ignored), and the same gate weights on them.
    assert torch.equal(_to_bs(routing_map, B, S), gates > 0)
    torch.testing.assert_close(_to_bs(probs, B, S).double(), gates, rtol=0, atol=1e-5)
    # Not vacuous: tokens do not all pick the same experts.
    assert len({tuple(sorted(r.tolist())) for r in top_idx}) > 3


def test_reference_tolerance_is_not_vacuous(randomised_model):
    model, ids = randomised_model
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    ref, _ = reference_forward(params, REF_CFG, ids)
    fc1 = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    swapped = dict(params, **{fc1: torch.cat(params[fc1].chunk(2)[::-1])})  # gate <-> up in one expert
    no_qk_norm = dataclasses.replace(REF_CFG, qk_layernorm=False)
    for other in (reference_forward(swapped, REF_CFG, ids)[0], reference_forward(params, no_qk_norm, ids)[0]):
        assert (other - ref).abs().max() > 100 * LOGITS_ATOL


def test_gradients_match_float64_reference(randomised_model):
    """Backward of a random projection of the logits, every parameter, against float64 autograd
    of the reference (router weight included: its gradient flows through the top-k softmax)."""
    model, ids = randomised_model
    gen = torch.Generator().manual_seed(1)
    proj = torch.randn(*ids.shape, REF_CFG.vocab_size, generator=gen, dtype=torch.float64)
    model.zero_grad()
    logits, _ = _megatron_forward(model, ids)
    (logits * proj.float()).sum().backward()
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    ref, _ = reference_forward(params, REF_CFG, ids)
    (ref * proj).sum().backward()
    for name, param in model.named_parameters():
        got, want = param.grad.double(), params[name].grad
        assert want.norm() > 0, f"{name}: no gradient in the reference"
        # float32 vs float64 accumulation: ~1e-6 relative of the gradient's norm.
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


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


@pytest.mark.parametrize(
    "layers,pp,first,last,vpp,expected",
    [
        (94, 4, 23, 23, None, [23, 24, 24, 23]),  # Qwen3-235B at PP=4
        (94, 2, 47, None, None, [47, 47]),
        (5, 2, 2, None, None, [2, 3]),
        (3, 2, None, 1, None, [2, 1]),
        (10, 3, 2, None, 2, [2, 4, 4]),
        (8, 2, None, None, None, [4, 4]),
    ],
)
def test_uneven_pipeline_stages_reach_megatron(layers, pp, first, last, vpp, expected):
    """The split, and Megatron-Core's own config accepting it (test_routing_align.py checks
    the same split against Megatron's get_num_layers_to_build)."""
    parallel = ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                              num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    assert parallel.stage_layers(layers) == expected
    config = to_transformer_config(ModelConfig(num_hidden_layers=layers), parallel, on_cpu=True)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (first, last)


@pytest.mark.parametrize(
    "layers,parallel,match",
    [
        (94, dict(pipeline_model_parallel_size=4), r"num_hidden_layers \(94\) is not divisible by "
         r"pipeline_model_parallel_size \(4\); for uneven stages set parallel.num_layers_in_first_pipeline_stage"),
        (94, dict(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=24),
         r"num_hidden_layers \(94\) minus parallel.num_layers_in_first_pipeline_stage \(24\) leaves 70 layers "
         r"for the 3 middle stage\(s\) of pipeline_model_parallel_size \(4\)"),
        (5, dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=2,
                 num_layers_in_last_pipeline_stage=2), r"leaves 1 layers for no middle stage"),
        (4, dict(pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=2,
                 num_layers_in_last_pipeline_stage=2), r"leaves 0 layers for the 1 middle stage"),
        (10, dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=3,
                  virtual_pipeline_model_parallel_size=2), r"stages hold \[3, 7\] layers .* not all divisible by "
         r"virtual_pipeline_model_parallel_size \(2\)"),
    ],
)
def test_uneven_pipeline_stages_refused(layers, parallel, match):
    with pytest.raises(ValueError, match=match):
        to_transformer_config(ModelConfig(num_hidden_layers=layers), ParallelConfig(**parallel), on_cpu=True)


def test_uneven_pipeline_stage_inputs():
    with pytest.raises(ValueError, match=r"num_layers_in_last_pipeline_stage \(2\) needs pipeline_model_parallel_size > 1"):
        ParallelConfig(num_layers_in_last_pipeline_stage=2)
    with pytest.raises(ValueError, match="parallel.num_layers_in_first_pipeline_stage must be a positive integer"):
        ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=0)
    # One place for the stage split: Megatron's field of the same name under model.megatron is refused.
    with pytest.raises(ValueError, match=r"model.megatron sets \['num_layers_in_first_pipeline_stage'\]: set them under parallel"):
        to_transformer_config(ModelConfig(num_hidden_layers=3, megatron={"num_layers_in_first_pipeline_stage": 2}),
                              ParallelConfig(pipeline_model_parallel_size=2), on_cpu=True)


def test_bad_parallel_and_dict_config():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="hiden_size"):
        model_config_from_dict({"hiden_size": 8})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("qwen9")


def test_gpu_fusions_follow_what_the_machine_provides(monkeypatch):
    """Fusions are on only where their kernels exist: TE's (wgrad accumulation, RoPE) with TE,
    Apex's wgrad kernel for the local spec; never on CPU; and TE's settings
    (grouped GEMM, its fusions) follow ``SAPO_MEGATRON_TE`` like the layer spec does."""
    from sapo_megatron.models import config as model_config

    off = model_config.gpu_fusions(on_cpu=True, transformer_engine=True)
    assert not any(off.values())
    te = model_config.gpu_fusions(on_cpu=False, transformer_engine=True)
    assert te["gradient_accumulation_fusion"] and te["apply_rope_fusion"]
    assert not te["bias_dropout_fusion"], "no biases, no dropout: nothing to fuse"
    local = model_config.gpu_fusions(on_cpu=False, transformer_engine=False)
    have_apex_wgrad = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    assert local["gradient_accumulation_fusion"] == have_apex_wgrad and not local["apply_rope_fusion"]
    # Its causal kernel ignores a packed row's block-diagonal mask: never on.
    assert not te["masked_softmax_fusion"] and not local["masked_softmax_fusion"]
    # The switch turns TE off for the spec and for every TE-only setting together.
    monkeypatch.setattr(model_config, "_importable", lambda name: name == "transformer_engine")
    monkeypatch.setenv("SAPO_MEGATRON_TE", "1")
    assert model_config.transformer_engine_requested()
    # (TransformerConfig itself refuses the RoPE fusion where TE's kernel does not import.)
    with_te = preset("qwen3-30b-a3b", megatron={"apply_rope_fusion": False})
    tc = to_transformer_config(with_te, ParallelConfig(expert_model_parallel_size=8), on_cpu=False)
    assert tc.moe_grouped_gemm and tc.gradient_accumulation_fusion
    monkeypatch.setenv("SAPO_MEGATRON_TE", "0")
    assert not model_config.transformer_engine_requested() and not model_config.use_transformer_engine()
    tc = to_transformer_config(preset("qwen3-30b-a3b"), ParallelConfig(expert_model_parallel_size=8), on_cpu=False)
    assert not tc.moe_grouped_gemm and not tc.gradient_accumulation_fusion and not tc.apply_rope_fusion
