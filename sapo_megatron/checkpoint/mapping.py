"""Expanding the per-architecture name tables into concrete tensors, and the lookup by architecture.

The tables themselves are data, one module per architecture under
:mod:`sapo_megatron.checkpoint.models` (rules: :class:`~sapo_megatron.checkpoint.models.common.Rule`).
Here they become :class:`Unit` s: one Megatron tensor, the concrete HF tensors it is made of,
their shapes for a given :class:`ModelConfig` (symbolic dimensions: :data:`DIMS`).

Nothing here knows about tensor/pipeline/expert parallelism: a Megatron name is always the
TP=PP=EP=1 name, and :mod:`sapo_megatron.step.sharding` maps it to and from a rank's shard.

Conversion units come in *groups* that are read and written together, which is what bounds
memory by about one layer: ``"embedding"``, then each layer index, then ``"final"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sapo_megatron.checkpoint.models import MAPPINGS, REFUSED
from sapo_megatron.checkpoint.models.common import ArchMapping, Rule
from sapo_megatron.models import ModelConfig


@dataclass(frozen=True)
class Unit:
    """One Megatron tensor and the concrete HF tensors it is converted from/to."""

    mcore: str
    hf: tuple[str, ...]
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    dims_used: tuple[str, ...]


# --------------------------------------------------------------------------- lookup


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

# Symbolic dimensions of ``Rule.hf_shapes``: what each means (for error messages) and its size.
DIMS: dict[str, tuple[str, Callable[[ModelConfig], int]]] = {
    "H": ("hidden_size", lambda c: c.hidden_size),
    "V": ("vocab_size", lambda c: c.vocab_size),
    "D": ("head_dim", lambda c: c.kv_channels),
    "Q": ("num_attention_heads x head_dim", lambda c: c.num_attention_heads * c.kv_channels),
    "KV": ("num_key_value_heads x head_dim", lambda c: c.num_key_value_heads * c.kv_channels),
    "F": ("intermediate_size", lambda c: c.intermediate_size),
    "FE": ("moe_intermediate_size", lambda c: c.moe_intermediate_size),
    "FS": ("n_shared_experts x moe_intermediate_size",
           lambda c: c.megatron.get("moe_shared_expert_intermediate_size") or 0),
    "E": ("number of routed experts", lambda c: c.num_experts),
}
DIM_MEANING = {symbol: meaning for symbol, (meaning, _) in DIMS.items()}


def dims(cfg: ModelConfig) -> dict[str, int]:
    """Sizes of the symbolic dimensions used in ``Rule.hf_shapes``, for ``cfg``."""
    return {symbol: size(cfg) for symbol, (_, size) in DIMS.items()}


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
