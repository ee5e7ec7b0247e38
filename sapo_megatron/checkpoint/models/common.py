"""What the per-architecture tables are made of: the rule type, templated names, HF config readers.

A :class:`Rule` pairs one Megatron-Core tensor (its single-rank name, local spec) with the HF
tensors it is made of, a ``kind`` naming the format change (see
:mod:`sapo_megatron.checkpoint.transforms`: ``copy``, ``qkv``, ``gate_up``) and the HF shapes
the config implies, written with symbolic dimensions (``"Q"`` = heads x head_dim, ...; see
:data:`sapo_megatron.checkpoint.mapping.DIMS`) so that a config/tensor mismatch can be reported
in the config's own terms. Templates use ``{i}`` for the layer and ``{e}`` for the expert.

An :class:`ArchMapping` is one architecture: its rules by part of the model (the defaults are
the Qwen3 layout every supported model starts from) and its ``config_from_hf``. Every
architecture module (:mod:`.qwen3_moe`, :mod:`.qwen3`, :mod:`.mixtral`, :mod:`.dots1`) builds
one from the pieces below; the parts they share (the attention block, the SwiGLU MLP,
embedding and head, the HF config fields every one of them has) are written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sapo_megatron.models import ModelConfig


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "copy"
    # One symbolic shape per HF tensor, e.g. (("Q", "H"), ("KV", "H"), ("KV", "H")).
    hf_shapes: tuple[tuple[str, ...], ...] = ()


# --------------------------------------------------------------------------- templated names

MCORE_LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."


def attention(qk_norm: bool) -> tuple[Rule, ...]:
    """Pre-attention norm, fused QKV, output projection and pre-MLP norm of a Llama-style layer."""
    L, H = MCORE_LAYER, HF_LAYER
    rules = [
        Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",), hf_shapes=(("H",),)),
        Rule(
            L + "self_attention.linear_qkv.weight",
            (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
            "qkv",
            (("Q", "H"), ("KV", "H"), ("KV", "H")),
        ),
        Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), hf_shapes=(("H", "Q"),)),
        Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), hf_shapes=(("H",),)),
    ]
    if qk_norm:
        rules += [
            Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), hf_shapes=(("D",),)),
            Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), hf_shapes=(("D",),)),
        ]
    return tuple(rules)


def glu(mcore_prefix: str, hf_prefix: str, names=("gate_proj", "up_proj", "down_proj"), ffn="F") -> tuple[Rule, ...]:
    """A SwiGLU MLP: HF's gate and up become Megatron's ``linear_fc1 = [gate; up]``."""
    gate, up, down = names
    return (
        Rule(
            mcore_prefix + "linear_fc1.weight",
            (f"{hf_prefix}{gate}.weight", f"{hf_prefix}{up}.weight"),
            "gate_up",
            ((ffn, "H"), (ffn, "H")),
        ),
        Rule(mcore_prefix + "linear_fc2.weight", (f"{hf_prefix}{down}.weight",), hf_shapes=(("H", ffn),)),
    )


def router(hf_gate: str) -> Rule:
    """The router's ``[experts, hidden]`` weight, from HF's gate at ``model.layers.{i}.<hf_gate>``."""
    return Rule(MCORE_LAYER + "mlp.router.weight", (HF_LAYER + hf_gate,), hf_shapes=(("E", "H"),))


@dataclass(frozen=True)
class ArchMapping:
    """One architecture's table. The defaults are the Qwen3 layout every supported model
    shares (embedding, Qwen3 attention with q/k norm, SwiGLU dense MLP, final norm, untied head);
    an architecture module states only how it differs."""

    architecture: str
    config_from_hf: Callable[[dict], ModelConfig]
    layer: tuple[Rule, ...] = field(default_factory=lambda: attention(qk_norm=True))
    dense_mlp: tuple[Rule, ...] = field(default_factory=lambda: DENSE_MLP)
    moe: tuple[Rule, ...] = ()
    expert: tuple[Rule, ...] = ()
    shared_expert: tuple[Rule, ...] = ()
    embedding: tuple[Rule, ...] = field(default_factory=lambda: EMBEDDING)
    final: tuple[Rule, ...] = field(default_factory=lambda: FINAL)
    output: tuple[Rule, ...] = field(default_factory=lambda: OUTPUT)
    # HF tensors that carry no weights (old checkpoints store rotary inverse frequencies).
    ignored_hf_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)


EMBEDDING = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), hf_shapes=(("V", "H"),)),)
FINAL = (Rule("decoder.final_layernorm.weight", ("model.norm.weight",), hf_shapes=(("H",),)),)
OUTPUT = (Rule("output_layer.weight", ("lm_head.weight",), hf_shapes=(("V", "H"),)),)
DENSE_MLP = glu(MCORE_LAYER + "mlp.", HF_LAYER + "mlp.")
# HF's per-expert modules `mlp.experts.{e}` (Qwen3-MoE, dots.llm1) -> SequentialMLP's local experts.
EXPERT_MLP = glu(MCORE_LAYER + "mlp.experts.local_experts.{e}.", HF_LAYER + "mlp.experts.{e}.", ffn="FE")


# --------------------------------------------------------------------------- HF config readers


def first_set(hf: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``config.json`` sets (not null), else ``default``."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def rope_theta(hf: dict) -> float:
    # transformers >= 5 nests it under rope_parameters; 4.x has it at top level.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (rope, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(
                f"rope scaling type {kind!r} is not supported (the model builder applies plain "
                f"RoPE); remove rope scaling from config.json or extend the builder"
            )
    return float(first_set(rope, "rope_theta", default=first_set(hf, "rope_theta", default=10000.0)))


def params_dtype(hf: dict) -> str:
    name = str(first_set(hf, "dtype", "torch_dtype", default="float32")).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def model_config(hf: dict, **fields: Any) -> ModelConfig:
    """A :class:`ModelConfig` from the fields every supported architecture reads the same way,
    plus the architecture's own ``fields``."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; the builder uses SwiGLU (silu)")
    if hf.get("attention_bias"):
        raise ValueError(
            "attention_bias=True is not supported: Megatron-Core's add_bias_linear would add "
            "biases to every linear layer, HF adds them to q/k/v/o only"
        )
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ValueError("sliding-window attention layers are not supported by the model builder")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=first_set(hf, "num_key_value_heads", default=hf["num_attention_heads"]),
        head_dim=first_set(hf, "head_dim"),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        params_dtype=params_dtype(hf),
        **fields,
    )


def routed_experts(hf: dict, count: str | tuple[str, ...], size: str = "moe_intermediate_size") -> dict[str, int]:
    """The three numbers of an MoE block, under each architecture's own HF names: expert count
    (the first of ``count`` that is set), top-k and per-expert FFN size."""
    names = (count,) if isinstance(count, str) else count
    return dict(
        num_experts=first_set(hf, *names),
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf[size],
    )
