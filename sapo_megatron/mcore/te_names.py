"""Transformer Engine spec parameter names, and the local-spec names we use for them.

Our canonical single-rank names (checkpoint tables, sharding, exports) are those of
Megatron-Core's local layer spec. With Transformer Engine on a GPU the same tensors are named
differently in two ways, and only here:

* TE fuses a norm into the linear layer that follows it: the pre-attention norm is
  ``self_attention.linear_qkv.layer_norm_weight`` (local: ``input_layernorm.weight``) and a dense
  layer's pre-MLP norm is ``mlp.linear_fc1.layer_norm_weight`` (local: ``pre_mlp_layernorm.weight``);
  an MoE layer keeps a separate ``pre_mlp_layernorm`` in both specs;
* grouped-GEMM experts hold local expert ``e`` as ``mlp.experts.linear_fc1.weight<e>``; the local
  spec's SequentialMLP names it ``mlp.experts.local_experts.<e>.linear_fc1.weight``.
"""

from __future__ import annotations

import re

FUSED_NORM_ALIASES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)
_GROUPED_EXPERT = re.compile(r"experts\.(linear_fc[12])\.weight(\d+)$")


def local_norm_name(name: str) -> str:
    """``name`` with a TE fused-norm suffix replaced by the local spec's norm name."""
    for te, local in FUSED_NORM_ALIASES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def is_grouped_expert(name: str) -> bool:
    return _GROUPED_EXPERT.search(name) is not None


def sequential_expert_name(name: str, expert_offset: int) -> str:
    """A grouped-GEMM expert's name as SequentialMLP's, its index shifted by ``expert_offset``
    (the first global expert of this expert-parallel rank)."""
    return _GROUPED_EXPERT.sub(
        lambda m: f"experts.local_experts.{expert_offset + int(m.group(2))}.{m.group(1)}.weight", name
    )
