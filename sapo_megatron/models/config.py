"""Architecture description of a Qwen3-MoE-shaped model, and its mapping onto Megatron-Core.

``ModelConfig`` names the architecture the way a Hugging Face ``config.json`` does (so that
checkpoint conversion and YAML files read naturally) and says nothing about parallelism.
:func:`to_transformer_config` turns it, plus a :class:`ParallelConfig`, into Megatron-Core's
own ``TransformerConfig``; any further ``TransformerConfig`` field can be passed through
``ModelConfig.megatron`` rather than being re-declared here, and unknown names are refused.

Choices that matter for RL and for parity with HF (FIELD-NOTES section 4):
- ``moe_router_pre_softmax=False``: softmax over the top-k logits, as Qwen3 with
  ``norm_topk_prob=True``.
- ``calculate_per_token_loss=True``: our loss function returns a sum already weighted by
  step-global denominators, and Megatron must then neither average over microbatches nor
  scale by the context-parallel size (see ``sapo_megatron.step.run``).
- On CPU the ``allgather`` dispatcher and ``SequentialMLP`` experts are used (the alltoall
  dispatcher creates a CUDA stream; grouped GEMM needs CUDA kernels).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def _require_positive_ints(obj, section: str, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{name} must be a positive integer, got {value!r}")


_UNEVEN = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")


def pipeline_stage_layers(
    num_layers: int,
    pp_size: int,
    *,
    first: int | None = None,
    last: int | None = None,
    vpp_size: int | None = None,
) -> list[int]:
    """Layers per pipeline rank, as Megatron-Core splits them (``get_num_layers_to_build``).

    ``first`` / ``last`` fix the first and last stage (``num_layers_in_{first,last}_pipeline_
    stage``); the stages between share the rest evenly. With ``vpp_size`` every rank's share is
    cut into that many equal virtual stages, so each must divide by it. Errors name the inputs.
    """
    counts: list[int | None] = [None] * pp_size
    if pp_size > 1 and first is not None:
        counts[0] = first
    if pp_size > 1 and last is not None:
        counts[-1] = last
    fixed = sum(c for c in counts if c is not None)
    left, middle = num_layers - fixed, counts.count(None)
    if first is None and last is None:
        if num_layers % pp_size:
            raise ValueError(
                f"model.num_hidden_layers ({num_layers}) is not divisible by "
                f"pipeline_model_parallel_size ({pp_size}); for uneven stages set "
                f"parallel.num_layers_in_first_pipeline_stage and/or "
                f"num_layers_in_last_pipeline_stage"
            )
    elif left < 0 or (middle and (left == 0 or left % middle)) or (not middle and left):
        given = ", ".join(f"parallel.{n} ({v})" for n, v in zip(_UNEVEN, (first, last)) if v is not None)
        where = (f"the {middle} middle stage(s) of pipeline_model_parallel_size ({pp_size})" if middle
                 else f"no middle stage at pipeline_model_parallel_size ({pp_size})")
        raise ValueError(
            f"model.num_hidden_layers ({num_layers}) minus {given} leaves {left} layers for "
            f"{where}: they must split evenly, at least one layer each"
        )
    per_rank = [c if c is not None else left // middle for c in counts]
    vpp = vpp_size or 1
    if any(c % vpp for c in per_rank):
        raise ValueError(
            f"pipeline stages hold {per_rank} layers (model.num_hidden_layers {num_layers} over "
            f"pipeline_model_parallel_size {pp_size}), not all divisible by "
            f"virtual_pipeline_model_parallel_size ({vpp})"
        )
    return per_rank


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism is whatever remains of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None
    # Required by Megatron-Core for MoE with TP>1 in training; default on whenever TP>1.
    sequence_parallel: bool | None = None
    # Uneven pipeline stages, Megatron-Core's TransformerConfig fields of the same names: the
    # layers of the first / last stage; the stages between share the rest evenly. None: an even
    # split. E.g. Qwen3-235B's 94 layers at PP=4: first 23, last 23 -> 23/24/24/23.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    def __post_init__(self) -> None:
        _require_positive_ints(
            self,
            "parallel",
            (
                "tensor_model_parallel_size",
                "pipeline_model_parallel_size",
                "expert_model_parallel_size",
                "context_parallel_size",
            ),
        )
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tensor_model_parallel_size > 1
        uneven = [n for n in _UNEVEN if getattr(self, n) is not None]
        _require_positive_ints(self, "parallel", uneven)
        if uneven and self.pipeline_model_parallel_size < 2:
            # Megatron-Core would build only that many layers on the single stage.
            raise ValueError(
                f"parallel.{uneven[0]} ({getattr(self, uneven[0])}) needs "
                f"pipeline_model_parallel_size > 1, got {self.pipeline_model_parallel_size}"
            )

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers held by each pipeline rank (all its virtual stages together)."""
        return pipeline_stage_layers(
            num_layers,
            self.pipeline_model_parallel_size,
            first=self.num_layers_in_first_pipeline_stage,
            last=self.num_layers_in_last_pipeline_stage,
            vpp_size=self.virtual_pipeline_model_parallel_size,
        )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer in Hugging Face terms (Qwen3-MoE naming)."""

    vocab_size: int = 64
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 128  # dense MLP layers
    moe_intermediate_size: int = 32  # per expert
    num_experts: int = 4
    num_experts_per_tok: int = 2
    # Dense layers: the first `first_k_dense` layers, plus any listed in `mlp_only_layers`.
    first_k_dense: int = 0
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_layernorm: bool = True
    init_method_std: float = 0.02
    # Load-balancing is usually off in RL updates; "aux_loss" / "seq_aux_loss" enable it.
    moe_router_load_balancing_type: str = "none"
    moe_aux_loss_coeff: float = 0.0
    params_dtype: str = "float32"
    # Further Megatron-Core TransformerConfig fields, passed through verbatim.
    megatron: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_positive_ints(
            self,
            "model",
            ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "num_experts_per_tok"),
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"model.num_experts ({self.num_experts})"
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"model.mlp_only_layers {bad} are outside [0, {self.num_hidden_layers})"
            )
        if self.params_dtype not in _DTYPES:
            raise ValueError(
                f"model.params_dtype must be one of {sorted(_DTYPES)}, got {self.params_dtype!r}"
            )

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per global layer index."""
        if not self.num_experts:
            return [0] * self.num_hidden_layers
        dense = set(range(self.first_k_dense)) | set(self.mlp_only_layers)
        return [0 if i in dense else 1 for i in range(self.num_hidden_layers)]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def transformer_engine_requested() -> bool:
    """Transformer Engine is importable and not turned off with ``SAPO_MEGATRON_TE=0``.

    The switch exists so that one process can build the local spec on a machine with TE (the
    GPU smoke builds both); the layer spec, grouped-GEMM experts and TE's fusions all follow it,
    since a local spec with TE-only settings does not build.
    """
    return os.environ.get("SAPO_MEGATRON_TE", "1") != "0" and _importable("transformer_engine")


def use_transformer_engine() -> bool:
    """TE's layer spec: CUDA present and TE requested (:func:`transformer_engine_requested`)."""
    return torch.cuda.is_available() and transformer_engine_requested()


def gpu_fusions(*, on_cpu: bool, transformer_engine: bool) -> dict[str, bool]:
    """Megatron's fused kernels, each on where this machine provides it (all off on CPU).

    - ``gradient_accumulation_fusion``: TE's linears accumulate the weight gradient into DDP's
      ``main_grad`` inside their GEMM; the local spec's linears need Apex's
      ``fused_weight_gradient_mlp_cuda`` for the same.
    - ``apply_rope_fusion``: TE's fused RoPE (also for THD, where the unfused path loops over
      sequences in Python with a ``cu_seqlens.tolist()`` in every layer).
    - ``masked_softmax_fusion`` stays off: the local spec's attention is built with a causal
      mask type, for which Megatron's fused kernel applies its own upper-triangular mask and
      ignores ours, so a packed row's samples would attend to each other; TE's attention has its
      own fused softmax and ignores the flag.
    - ``bias_dropout_fusion`` stays off: these models have no linear biases and no dropout, so
      the fused kernel would be one residual add, compiled by ``torch.compile`` in every process.
    - ``persist_layer_norm``: Apex's persistent LayerNorm; RMSNorm does not use it.
    """
    gpu = not on_cpu
    return dict(
        gradient_accumulation_fusion=gpu and (transformer_engine or _importable("fused_weight_gradient_mlp_cuda")),
        apply_rope_fusion=gpu and transformer_engine,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
    )


def to_transformer_config(model: ModelConfig, parallel: ParallelConfig, *, on_cpu: bool):
    """Build Megatron-Core's ``TransformerConfig`` for ``model`` under ``parallel``."""
    from megatron.core.transformer import TransformerConfig

    te = not on_cpu and transformer_engine_requested()

    if model.num_attention_heads % parallel.tensor_model_parallel_size:
        raise ValueError(
            f"model.num_attention_heads ({model.num_attention_heads}) is not divisible by "
            f"tensor_model_parallel_size ({parallel.tensor_model_parallel_size})"
        )
    misplaced = sorted(set(_UNEVEN) & set(model.megatron))
    if misplaced:
        # One source for the stage split: the parallel layout, checked against the layers below.
        raise ValueError(f"model.megatron sets {misplaced}: set them under parallel instead")
    parallel.stage_layers(model.num_hidden_layers)
    if model.num_experts and model.num_experts % parallel.expert_model_parallel_size:
        raise ValueError(
            f"model.num_experts ({model.num_experts}) is not divisible by "
            f"expert_model_parallel_size ({parallel.expert_model_parallel_size})"
        )
    dtype = model.torch_dtype
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        **gpu_fusions(on_cpu=on_cpu, transformer_engine=te),
    )
    if model.num_experts:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.num_experts_per_tok,
            moe_ffn_hidden_size=model.moe_intermediate_size,
            moe_layer_freq=model.moe_layer_pattern(),
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type=model.moe_router_load_balancing_type,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
            # Grouped GEMM experts are TE's (TEGroupedMLP); without TE, megatron-core 0.16's
            # local spec would pick the legacy GroupedMLP, which needs the grouped_gemm package.
            moe_grouped_gemm=te,
            moe_router_dtype="fp32",
        )
    allowed = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(model.megatron) - allowed)
    if unknown:
        raise ValueError(
            f"model.megatron has keys that are not Megatron-Core TransformerConfig fields: "
            f"{unknown}"
        )
    kwargs.update(model.megatron)
    return TransformerConfig(**kwargs)


PRESETS: dict[str, ModelConfig] = {
    # Laptop-sized MoE for the CPU demo and the distributed tests.
    "tiny-moe": ModelConfig(),
    # Qwen/Qwen3-30B-A3B config.json.
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=40960,
        params_dtype="bfloat16",
    ),
    # Qwen/Qwen3-235B-A22B config.json.
    "qwen3-235b-a22b": ModelConfig(
        vocab_size=151936,
        hidden_size=4096,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=40960,
        params_dtype="bfloat16",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
