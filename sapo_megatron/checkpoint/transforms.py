"""Format changes between HF and Megatron-Core tensors: pure functions on full tensors.

- ``qkv``: Megatron-Core's fused ``linear_qkv`` interleaves per query group
  ``[q x heads_per_group, k, v]`` (each ``head_dim`` rows), which is what lets a TP rank hold
  whole query groups as one contiguous slice.
- ``gate_up``: ``linear_fc1 = cat([gate, up])`` (Megatron's gated linear unit takes the first
  half as the gate).
- ``copy``: same tensor, same layout.

Every function is exact (cat/view/split only), so HF -> Megatron -> HF is bit-identical.

``to_hf(..., views=True)`` returns views of the Megatron tensor (no copy): the weight sync
copies each byte once, straight into its bucket or file buffer. ``shards=T`` applies the split to
one tensor-parallel slice along dim 0 (``T`` slices, each holding whole query groups, or
``[gate_r; up_r]``): HF tensor ``i`` of the full tensor is then the concatenation over the slices
of HF tensor ``i`` of each slice, which is what lets every rank send its own pieces.
"""

from __future__ import annotations

import torch

from sapo_megatron.models import ModelConfig


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    hidden = q.shape[-1]
    q_g = q.reshape(num_query_groups, -1, hidden)
    k_g = k.reshape(num_query_groups, -1, hidden)
    v_g = v.reshape(num_query_groups, -1, hidden)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int, *, views: bool = False):
    hidden = qkv.shape[-1]
    per_group = num_heads // num_query_groups * head_dim
    grouped = qkv.reshape(num_query_groups, per_group + 2 * head_dim, hidden)
    # (groups, rows, hidden) views; flattening a strided view would copy, so views keep 3 dims.
    q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
    if views:
        return q, k, v
    return (
        q.reshape(-1, hidden).contiguous(),
        k.reshape(-1, hidden).contiguous(),
        v.reshape(-1, hidden).contiguous(),
    )


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, *, views: bool = False):
    gate, up = fc1.chunk(2, dim=0)
    return (gate, up) if views else (gate.contiguous(), up.contiguous())


def to_mcore(kind: str, hf_tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return hf_tensors[0]
    if kind == "qkv":
        return merge_qkv(*hf_tensors, num_query_groups=cfg.num_key_value_heads)
    if kind == "gate_up":
        return merge_gate_up(*hf_tensors)
    raise ValueError(f"unknown conversion kind {kind!r}")


def to_hf(kind: str, mcore_tensor: torch.Tensor, cfg: ModelConfig, *, views: bool = False,
          shards: int = 1) -> tuple[torch.Tensor, ...]:
    """HF tensors of ``mcore_tensor`` (contiguous copies; ``views=True``: views of it, where a
    QKV view is ``(groups, rows, hidden)``, reshape it to the HF shape when copying). ``shards``:
    ``mcore_tensor`` is one of that many dim-0 tensor-parallel slices (see the module docstring)."""
    if kind == "copy":
        return (mcore_tensor,)
    if kind == "qkv":
        heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
        if heads % shards or groups % shards:
            raise ValueError(f"QKV of {heads} heads in {groups} query groups cannot be cut into {shards} "
                             f"tensor-parallel slices of whole groups")
        return split_qkv(mcore_tensor, heads // shards, groups // shards, cfg.kv_channels, views=views)
    if kind == "gate_up":
        return split_gate_up(mcore_tensor, views=views)
    raise ValueError(f"unknown conversion kind {kind!r}")
