"""Format changes between HF and Megatron-Core tensors: pure functions on full tensors.

- ``qkv``: Megatron-Core's fused ``linear_qkv`` interleaves per query group
  ``[q x heads_per_group, k, v]`` (each ``head_dim`` rows), which is what lets a TP rank hold
  whole query groups as one contiguous slice.
- ``gate_up``: ``linear_fc1 = cat([gate, up])`` (Megatron's gated linear unit takes the first
  half as the gate).
- ``copy``: same tensor, same layout.

Every function is exact (cat/view/split only), so HF -> Megatron -> HF is bit-identical.
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


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    hidden = qkv.shape[-1]
    per_group = num_heads // num_query_groups * head_dim
    grouped = qkv.reshape(num_query_groups, per_group + 2 * head_dim, hidden)
    q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, hidden).contiguous(),
        k.reshape(-1, hidden).contiguous(),
        v.reshape(-1, hidden).contiguous(),
    )


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_mcore(kind: str, hf_tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return hf_tensors[0]
    if kind == "qkv":
        return merge_qkv(*hf_tensors, num_query_groups=cfg.num_key_value_heads)
    if kind == "gate_up":
        return merge_gate_up(*hf_tensors)
    raise ValueError(f"unknown conversion kind {kind!r}")


def to_hf(kind: str, mcore_tensor: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    if kind == "copy":
        return (mcore_tensor,)
    if kind == "qkv":
        return split_qkv(mcore_tensor, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_channels)
    if kind == "gate_up":
        return split_gate_up(mcore_tensor)
    raise ValueError(f"unknown conversion kind {kind!r}")
