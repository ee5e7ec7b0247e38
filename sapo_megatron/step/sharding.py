"""Map between a rank's sharded Megatron-Core parameters and the full (single-rank) tensors.

This is pure distribution bookkeeping, kept apart from any format conversion (HF names,
QKV interleave): a full tensor here is exactly what a TP=PP=EP=1 Megatron-Core model holds under
the same parameter name. Three things differ on a sharded rank:

- names: pipeline stages number their layers from 0 (the global index is
  ``layer.layer_number - 1``) and expert-parallel ranks number their local experts from 0
  (global = ``ep_rank * num_local_experts + local``); grouped-GEMM experts
  (``experts.linear_fc1.weight<e>``) map to the SequentialMLP name of the same expert;
- tensor-parallel slices: parameters with ``tensor_model_parallel=True`` hold a contiguous
  slice along ``partition_dim``, over the expert-TP group for experts and the TP group
  otherwise;
- gated-linear-unit ``linear_fc1``: the full weight is ``[gate; up]`` and each TP rank holds
  ``[gate_r; up_r]``, so the slice is taken from each half.

Used by checkpoint loading/export (:mod:`sapo_megatron.checkpoint.live`) and by the
distributed tests (``tests/helpers.py`` loads one reference weight set into any layout and
gathers gradients back with these functions).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from sapo_megatron.mcore.te_names import is_grouped_expert, sequential_expert_name

_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)")


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _global_layer_index(model, local_index: int) -> int:
    return unwrap(model).decoder.layers[local_index].layer_number - 1


def global_name(model, name: str) -> str:
    """The single-rank parameter name of this rank's parameter ``name``."""
    from megatron.core import parallel_state

    m = _LAYER.search(name)
    if m:
        layer_idx = int(m.group(2))
        name = _LAYER.sub(
            lambda mm: f"{mm.group(1)}{_global_layer_index(model, layer_idx)}{mm.group(3)}",
            name,
            count=1,
        )
        if _EXPERT.search(name) or is_grouped_expert(name):
            experts = unwrap(model).decoder.layers[layer_idx].mlp.experts
            num_local = getattr(experts, "num_local_experts", None) or len(experts.local_experts)
            offset = parallel_state.get_expert_model_parallel_rank() * num_local
            name = _EXPERT.sub(
                lambda mm: f"{mm.group(1)}{offset + int(mm.group(2))}{mm.group(3)}", name, count=1
            )
            # Both expert layouts get the SequentialMLP name: one canonical full-tensor name.
            name = sequential_expert_name(name, offset)
    return name


def _tp_layout(param):
    """(group, rank, size, dim) of the tensor-parallel split of ``param``, or None."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return None
    is_expert = not getattr(param, "allreduce", True)
    if is_expert:
        group = parallel_state.get_expert_tensor_parallel_group()
        rank = parallel_state.get_expert_tensor_parallel_rank()
        size = parallel_state.get_expert_tensor_parallel_world_size()
    else:
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return None
    return group, rank, size, param.partition_dim


_FC1 = re.compile(r"linear_fc1\.weight\d*$")  # SequentialMLP / dense MLP, or grouped-GEMM expert


def _is_glu_fc1(name: str, config) -> bool:
    return bool(config.gated_linear_unit and _FC1.search(name))


def shard_full_tensor(full: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """This rank's slice of the full tensor ``full`` for local parameter ``param``."""
    layout = _tp_layout(param)
    if layout is None:
        return full
    _, rank, size, dim = layout
    if _is_glu_fc1(name, config):
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(size, dim)[rank]


def gather_full_tensor(local: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """Inverse of :func:`shard_full_tensor` (a collective over the parameter's TP group)."""
    layout = _tp_layout(param)
    if layout is None:
        return local
    group, _, size, dim = layout
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if _is_glu_fc1(name, config):
        halves = [p.chunk(2, dim) for p in parts]
        gates = torch.cat([h[0] for h in halves], dim)
        ups = torch.cat([h[1] for h in halves], dim)
        return torch.cat([gates, ups], dim)
    return torch.cat(parts, dim)
