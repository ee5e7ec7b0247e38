"""Hugging Face <-> Megatron-Core parameter names, as data: one table per architecture.

A :class:`Rule` pairs one Megatron-Core tensor (its single-rank name, local spec) with the HF
tensors it is made of, a ``kind`` naming the format change (see
:mod:`sapo_megatron.checkpoint.transforms`: ``copy``, ``qkv``, ``gate_up``) and the HF shapes the
config implies, written with symbolic dimensions (``"Q"`` = heads x head_dim, ...; see
:func:`dims`) so that a config/tensor mismatch can be reported in the config's own terms.
Templates use ``{i}`` for the layer and ``{e}`` for the expert.

Nothing here knows about tensor/pipeline/expert parallelism: a Megatron name is always the
TP=PP=EP=1 name, and :mod:`sapo_megatron.step.sharding` maps it to and from a rank's shard.

Conversion units come in *groups* that are read and written together, which is what bounds
memory by about one layer: ``"embedding"``, then each layer index, then ``"final"``.

Supported: Qwen3-MoE, Qwen3 (dense), Mixtral, and dots.llm1 (``Dots1ForCausalLM``), which is
the DeepSeek-V3 MoE block (dense first layers, a shared expert, sigmoid router with expert
score-correction bias, group-limited top-k, routed scaling) on Qwen3 attention. DeepSeek-V3
itself is refused: see :data:`REFUSED`.
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


@dataclass(frozen=True)
class Unit:
    """One Megatron tensor and the concrete HF tensors it is converted from/to."""

    mcore: str
    hf: tuple[str, ...]
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    dims_used: tuple[str, ...]


@dataclass(frozen=True)
class ArchMapping:
    architecture: str
    config_from_hf: Callable[[dict], ModelConfig]
    embedding: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    dense_mlp: tuple[Rule, ...]
    moe: tuple[Rule, ...] = ()
    expert: tuple[Rule, ...] = ()
    shared_expert: tuple[Rule, ...] = ()
    final: tuple[Rule, ...] = ()
    output: tuple[Rule, ...] = ()
    # HF tensors that carry no weights (old checkpoints store rotary inverse frequencies).
    ignored_hf_suffixes: tuple[str, ...] = field(default=("rotary_emb.inv_freq",))


# --------------------------------------------------------------------------- tables

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."


def _attention(qk_norm: bool) -> tuple[Rule, ...]:
    rules = [
        Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), hf_shapes=(("H",),)),
        Rule(
            _L + "self_attention.linear_qkv.weight",
            (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
            "qkv",
            (("Q", "H"), ("KV", "H"), ("KV", "H")),
        ),
        Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), hf_shapes=(("H", "Q"),)),
        Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), hf_shapes=(("H",),)),
    ]
    if qk_norm:
        rules += [
            Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), hf_shapes=(("D",),)),
            Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), hf_shapes=(("D",),)),
        ]
    return tuple(rules)


def _glu(mcore_prefix: str, hf_prefix: str, names=("gate_proj", "up_proj", "down_proj"), ffn="F"):
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


_EMBEDDING = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), hf_shapes=(("V", "H"),)),)
_FINAL = (Rule("decoder.final_layernorm.weight", ("model.norm.weight",), hf_shapes=(("H",),)),)
_OUTPUT = (Rule("output_layer.weight", ("lm_head.weight",), hf_shapes=(("V", "H"),)),)
_DENSE = _glu(_L + "mlp.", _H + "mlp.")
_EXPERT = _glu(_L + "mlp.experts.local_experts.{e}.", _H + "mlp.experts.{e}.", ffn="FE")


# --------------------------------------------------------------------------- configs


def _get(hf: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _rope_theta(hf: dict) -> float:
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
    return float(_get(rope, "rope_theta", default=_get(hf, "rope_theta", default=10000.0)))


def _dtype(hf: dict) -> str:
    name = str(_get(hf, "dtype", "torch_dtype", default="float32")).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _common(hf: dict) -> dict[str, Any]:
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
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=_get(hf, "num_key_value_heads", default=hf["num_attention_heads"]),
        head_dim=_get(hf, "head_dim"),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        params_dtype=_dtype(hf),
    )


def qwen3_moe_config(hf: dict) -> ModelConfig:
    step = hf.get("decoder_sparse_step", 1)
    layers = hf["num_hidden_layers"]
    # HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    megatron = {}
    if not hf.get("norm_topk_prob", True):
        # Softmax over all experts, no renormalisation of the top-k.
        megatron["moe_router_pre_softmax"] = True
    return ModelConfig(
        **_common(hf),
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_experts=_get(hf, "num_experts", "num_local_experts"),
        num_experts_per_tok=hf["num_experts_per_tok"],
        mlp_only_layers=sorted(dense),
        qk_layernorm=True,
        megatron=megatron,
    )


def qwen3_config(hf: dict) -> ModelConfig:
    return ModelConfig(**_common(hf), num_experts=0, qk_layernorm=True)


def mixtral_config(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") is not None:
        raise ValueError(
            f"Mixtral sliding_window={hf['sliding_window']} is not supported by the model builder "
            f"(Mixtral-8x7B/8x22B have null)"
        )
    common = _common(hf)
    return ModelConfig(
        **common,
        # Mixtral's intermediate_size is the per-expert size; every layer is MoE.
        moe_intermediate_size=hf["intermediate_size"],
        num_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        qk_layernorm=False,
    )


def dots1_config(hf: dict) -> ModelConfig:
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
    return ModelConfig(
        **_common(hf),
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        first_k_dense=hf.get("first_k_dense_replace", 0),
        qk_layernorm=True,
        megatron=megatron,
    )


# --------------------------------------------------------------------------- registry

MAPPINGS: dict[str, ArchMapping] = {
    "Qwen3MoeForCausalLM": ArchMapping(
        "Qwen3MoeForCausalLM",
        qwen3_moe_config,
        embedding=_EMBEDDING,
        layer=_attention(qk_norm=True),
        dense_mlp=_DENSE,
        moe=(Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), hf_shapes=(("E", "H"),)),),
        expert=_EXPERT,
        final=_FINAL,
        output=_OUTPUT,
    ),
    "Qwen3ForCausalLM": ArchMapping(
        "Qwen3ForCausalLM",
        qwen3_config,
        embedding=_EMBEDDING,
        layer=_attention(qk_norm=True),
        dense_mlp=_DENSE,
        final=_FINAL,
        output=_OUTPUT,
    ),
    "MixtralForCausalLM": ArchMapping(
        "MixtralForCausalLM",
        mixtral_config,
        embedding=_EMBEDDING,
        layer=_attention(qk_norm=False),
        dense_mlp=(),
        moe=(Rule(_L + "mlp.router.weight", (_H + "block_sparse_moe.gate.weight",), hf_shapes=(("E", "H"),)),),
        # w1 = gate, w3 = up, w2 = down.
        expert=_glu(
            _L + "mlp.experts.local_experts.{e}.", _H + "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"), "FE"
        ),
        final=_FINAL,
        output=_OUTPUT,
    ),
    "Dots1ForCausalLM": ArchMapping(
        "Dots1ForCausalLM",
        dots1_config,
        embedding=_EMBEDDING,
        layer=_attention(qk_norm=True),
        dense_mlp=_DENSE,
        moe=(
            Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), hf_shapes=(("E", "H"),)),
            Rule(_L + "mlp.router.expert_bias", (_H + "mlp.gate.e_score_correction_bias",), hf_shapes=(("E",),)),
        ),
        expert=_EXPERT,
        shared_expert=_glu(_L + "mlp.shared_experts.", _H + "mlp.shared_experts.", ffn="FS"),
        final=_FINAL,
        output=_OUTPUT,
    ),
}

# Architectures we recognise but cannot build, and why.
REFUSED: dict[str, str] = {
    "DeepseekV3ForCausalLM": (
        "DeepSeek-V3 uses multi-latent attention (q_lora_rank/kv_lora_rank), which needs "
        "Megatron-Core's MLATransformerConfig and MLA layer spec; sapo_megatron's builder makes a "
        "plain TransformerConfig with GQA attention. Its MoE block (dense first layers, shared "
        "experts, sigmoid router with expert bias) is supported: see Dots1ForCausalLM"
    ),
    "DeepseekV2ForCausalLM": "multi-latent attention is not supported (see DeepseekV3ForCausalLM)",
}


def architecture_of(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(
            f"config.json must name exactly one architecture, got {archs!r}; "
            f"supported: {sorted(MAPPINGS)}"
        )
    return archs[0]


def mapping_for(hf_config: dict) -> ArchMapping:
    arch = architecture_of(hf_config)
    if arch in REFUSED:
        raise ValueError(f"unsupported architecture {arch}: {REFUSED[arch]}. Supported: {sorted(MAPPINGS)}")
    if arch not in MAPPINGS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(MAPPINGS)}")
    return MAPPINGS[arch]


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """Our :class:`ModelConfig` for an HF ``config.json`` (as a dict)."""
    return mapping_for(hf_config).config_from_hf(hf_config)


# --------------------------------------------------------------------------- expansion


def dims(cfg: ModelConfig) -> dict[str, int]:
    """Symbolic dimensions used in ``Rule.hf_shapes``."""
    return {
        "H": cfg.hidden_size,
        "V": cfg.vocab_size,
        "D": cfg.kv_channels,
        "Q": cfg.num_attention_heads * cfg.kv_channels,
        "KV": cfg.num_key_value_heads * cfg.kv_channels,
        "F": cfg.intermediate_size,
        "FE": cfg.moe_intermediate_size,
        "FS": cfg.megatron.get("moe_shared_expert_intermediate_size") or 0,
        "E": cfg.num_experts,
    }


DIM_MEANING = {
    "H": "hidden_size",
    "V": "vocab_size",
    "D": "head_dim",
    "Q": "num_attention_heads x head_dim",
    "KV": "num_key_value_heads x head_dim",
    "F": "intermediate_size",
    "FE": "moe_intermediate_size",
    "FS": "n_shared_experts x moe_intermediate_size",
    "E": "number of routed experts",
}


def groups(cfg: ModelConfig) -> list:
    """Conversion groups in file order: embedding, each layer, final."""
    return ["embedding", *range(cfg.num_hidden_layers), "final"]


def group_of(mcore_name: str):
    """The group a Megatron single-rank name belongs to."""
    if mcore_name.startswith("decoder.layers."):
        return int(mcore_name.split(".")[2])
    if mcore_name.startswith("embedding."):
        return "embedding"
    return "final"


def group_order(group) -> tuple:
    if group == "embedding":
        return (0, 0)
    if group == "final":
        return (2, 0)
    return (1, int(group))


def _expand(rule: Rule, d: dict[str, int], **fmt) -> Unit:
    used = tuple(sorted({s for shape in rule.hf_shapes for s in shape}))
    return Unit(
        mcore=rule.mcore.format(**fmt),
        hf=tuple(h.format(**fmt) for h in rule.hf),
        kind=rule.kind,
        hf_shapes=tuple(tuple(d[s] for s in shape) for shape in rule.hf_shapes),
        dims_used=used,
    )


def units(mapping: ArchMapping, cfg: ModelConfig, group) -> list[Unit]:
    """The conversion units of one group, in table order."""
    d = dims(cfg)
    if group == "embedding":
        return [_expand(r, d) for r in mapping.embedding]
    if group == "final":
        rules = list(mapping.final) + ([] if cfg.tie_word_embeddings else list(mapping.output))
        return [_expand(r, d) for r in rules]
    i = int(group)
    out = [_expand(r, d, i=i) for r in mapping.layer]
    if cfg.moe_layer_pattern()[i]:
        if not mapping.moe:
            raise ValueError(f"{mapping.architecture} has no MoE layers, but layer {i} is MoE in the config")
        out += [_expand(r, d, i=i) for r in mapping.moe]
        for e in range(cfg.num_experts):
            out += [_expand(r, d, i=i, e=e) for r in mapping.expert]
        if d["FS"]:
            out += [_expand(r, d, i=i) for r in mapping.shared_expert]
    else:
        if not mapping.dense_mlp:
            raise ValueError(f"{mapping.architecture} has no dense MLP layers, but layer {i} is dense in the config")
        out += [_expand(r, d, i=i) for r in mapping.dense_mlp]
    return out


def all_units(mapping: ArchMapping, cfg: ModelConfig) -> dict[Any, list[Unit]]:
    return {g: units(mapping, cfg, g) for g in groups(cfg)}


def units_by_mcore_name(mapping: ArchMapping, cfg: ModelConfig, group) -> dict[str, Unit]:
    return {u.mcore: u for u in units(mapping, cfg, group)}
