"""Load into, and export from, a live (sharded) Megatron-Core model.

Loading: every rank walks its own parameters (and persistent buffers such as the router's
``expert_bias``), names each by its single-rank name (``sharding.global_name``), reads only those
full tensors, one layer at a time, and keeps its slice (``sharding.shard_full_tensor``). Nothing
is communicated, so it works at any TP/PP/EP layout. Sources: a sapo_megatron checkpoint
(:func:`load_into_model`) or an HF directory directly (:func:`load_hf_into_model`).

Export: all ranks agree on one global order of tensors (embedding, layers, final); for each
tensor the holders gather its TP slices (``sharding.gather_full_tensor``) and its owner (lowest
rank holding it) sends the full tensor to rank 0, which converts and writes it. Every rank
walks the same order, so the collectives cannot deadlock, and rank 0 holds one tensor plus the
writer's buffer (:func:`export_hf`, :func:`save_from_model`). Used for weight sync to SGLang.

Every rank must call these functions (they are collective under torch.distributed).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sapo_megatron.checkpoint.convert import check_hf_against_config
from sapo_megatron.collectives import group_device
from sapo_megatron.checkpoint.hf_io import HFCheckpoint, HFShardWriter, write_hf_config
from sapo_megatron.checkpoint.mapping import (
    all_units,
    group_of,
    group_order,
    mapping_for,
    units_by_mcore_name,
)
from sapo_megatron.checkpoint.mcore_io import McoreCheckpoint, McoreCheckpointWriter
from sapo_megatron.checkpoint.transforms import to_hf, to_mcore
from sapo_megatron.step.sharding import gather_full_tensor, global_name, shard_full_tensor, unwrap

# The Transformer Engine spec fuses the pre-attention / dense pre-MLP norms into the following
# linear layer; our names are the local spec's.
_TE_ALIASES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)
_TIED_SOURCE = "embedding.word_embeddings.weight"


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _local_tensors(inner) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters plus persistent tensor buffers (the router's expert_bias)."""
    yield from inner.named_parameters()
    persistent = set(inner.state_dict(keep_vars=True))
    for name, buf in inner.named_buffers():
        if name in persistent and buf is not None:
            yield name, buf


def _canonical(inner, local_name: str) -> str:
    name = global_name(inner, local_name)
    for te, local in _TE_ALIASES:
        if name.endswith(te):
            name = name[: -len(te)] + local
    return name


def _load(model, fetch: Callable[[object, list[str]], dict[str, torch.Tensor]], source: str) -> None:
    entries = defaultdict(list)
    for chunk in _chunks(model):
        inner = unwrap(chunk)
        tied = inner.share_embeddings_and_output_weights
        for local_name, tensor in _local_tensors(inner):
            name = _canonical(inner, local_name)
            # A tied head on the last pipeline stage is a copy of the embedding.
            src = _TIED_SOURCE if tied and name == "output_layer.weight" else name
            entries[group_of(src)].append((inner, local_name, tensor, src))
    with torch.no_grad():
        for group in sorted(entries, key=group_order):
            full = fetch(group, sorted({e[3] for e in entries[group]}))
            for inner, local_name, tensor, src in entries[group]:
                shard = shard_full_tensor(full[src], tensor, local_name, inner.config)
                if shard.shape != tensor.shape:
                    raise ValueError(
                        f"{source}: tensor {src!r} has full shape {tuple(full[src].shape)}, giving a "
                        f"shard of shape {tuple(shard.shape)} for local {local_name!r}, which has "
                        f"shape {tuple(tensor.shape)}; the model was built from a different config"
                    )
                tensor.copy_(shard)
            del full


def load_into_model(model, ckpt_dir: str | os.PathLike) -> dict:
    """Load this rank's shards of a sapo_megatron checkpoint; returns the checkpoint's HF config."""
    ckpt = McoreCheckpoint(ckpt_dir)
    _load(model, lambda group, names: ckpt.load(names), f"checkpoint {ckpt.dir}")
    return ckpt.hf_config


def load_hf_into_model(model, hf_dir: str | os.PathLike) -> dict:
    """Load this rank's shards straight from HF safetensors; returns the HF config."""
    reader = HFCheckpoint(hf_dir)
    mapping = mapping_for(reader.config)
    cfg = mapping.config_from_hf(reader.config)
    check_hf_against_config(reader, all_units(mapping, cfg), cfg)

    def fetch(group, names):
        by_name = units_by_mcore_name(mapping, cfg, group)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"model tensors {unknown[:3]} have no HF source in the {mapping.architecture} mapping "
                f"for {reader.dir}/config.json; was the model built from this config?"
            )
        out = {n: to_mcore(by_name[n].kind, [reader.get(h) for h in by_name[n].hf], cfg) for n in names}
        reader.release()
        return out

    _load(model, fetch, f"HF checkpoint {reader.dir}")
    return reader.config


@dataclasses.dataclass
class _GatherPlan:
    order: list[str]
    owner: dict[str, int]
    dtype: dict[str, torch.dtype]
    local: dict[str, tuple]


def _plan_gather(model) -> _GatherPlan:
    local = {}
    for chunk in _chunks(model):
        inner = unwrap(chunk)
        tied = inner.share_embeddings_and_output_weights
        for local_name, tensor in _local_tensors(inner):
            name = _canonical(inner, local_name)
            if tied and name == "output_layer.weight":
                continue
            local[name] = (inner, local_name, tensor)
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, {n: str(t.dtype).removeprefix("torch.") for n, (_, _, t) in local.items()})
    owner, dtype = {}, {}
    for rank, names in enumerate(held):
        for name, dt in names.items():
            owner.setdefault(name, rank)
            dtype[name] = getattr(torch, dt)
    order = sorted(owner, key=lambda n: (group_order(group_of(n)), n))
    return _GatherPlan(order, owner, dtype, local)


def _iter_full(plan: _GatherPlan) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Full tensors in ``plan.order`` on rank 0 (None elsewhere); collective."""
    rank = dist.get_rank()
    for name in plan.order:
        full = None
        if name in plan.local:
            inner, local_name, tensor = plan.local[name]
            full = gather_full_tensor(tensor.detach(), tensor, local_name, inner.config).cpu()
        src = plan.owner[name]
        # Point-to-point tensors on the default group's device (CUDA under NCCL).
        device = group_device()
        if src != 0 and rank == src:
            header = torch.zeros(8, dtype=torch.int64, device=device)
            header[0] = full.dim()
            header[1 : 1 + full.dim()] = torch.tensor(full.shape, device=device)
            dist.send(header, dst=0)
            dist.send(full.to(device).contiguous(), dst=0)
        elif src != 0 and rank == 0:
            header = torch.empty(8, dtype=torch.int64, device=device)
            dist.recv(header, src=src)
            shape = header[1 : 1 + int(header[0])].tolist()
            full = torch.empty(shape, dtype=plan.dtype[name], device=device)
            dist.recv(full, src=src)
            full = full.cpu()
        yield name, (full if rank == 0 else None)


def _check_names(plan: _GatherPlan, expected: set[str], what: str) -> None:
    # Runs on every rank with the same inputs, so all ranks raise together (no hang).
    missing, extra = sorted(expected - set(plan.order)), sorted(set(plan.order) - expected)
    if missing or extra:
        raise ValueError(f"{what}: model lacks {missing[:3]} and has unmapped {extra[:3]}")


def export_hf(
    model,
    out_dir: str | os.PathLike,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> None:
    """Write the live model as HF safetensors + config.json (rank 0 writes; collective)."""
    mapping = mapping_for(hf_config)
    cfg = mapping.config_from_hf(hf_config)
    by_mcore = {u.mcore: u for us in all_units(mapping, cfg).values() for u in us}
    plan = _plan_gather(model)
    _check_names(plan, set(by_mcore), f"export to {mapping.architecture}")
    writer = HFShardWriter(out_dir, max_shard_bytes) if dist.get_rank() == 0 else None
    for name, full in _iter_full(plan):
        if writer is None:
            continue
        unit = by_mcore[name]
        for hf_name, tensor in zip(unit.hf, to_hf(unit.kind, full, cfg)):
            writer.add(hf_name, tensor if dtype is None else tensor.to(dtype))
    if writer is not None:
        writer.close()
        write_hf_config(out_dir, hf_config)
    dist.barrier()


def save_from_model(model, ckpt_dir: str | os.PathLike, hf_config: dict) -> None:
    """Write the live model as a sapo_megatron checkpoint (rank 0 writes; collective)."""
    mapping = mapping_for(hf_config)
    cfg = mapping.config_from_hf(hf_config)
    expected = {u.mcore for us in all_units(mapping, cfg).values() for u in us}
    plan = _plan_gather(model)
    _check_names(plan, expected, f"save as {mapping.architecture}")
    writer = None
    if dist.get_rank() == 0:
        writer = McoreCheckpointWriter(
            ckpt_dir,
            architecture=mapping.architecture,
            hf_config=hf_config,
            model_config=dataclasses.asdict(cfg),
        )
    group, tensors = None, {}
    for name, full in _iter_full(plan):
        if writer is None:
            continue
        if tensors and group_of(name) != group:
            writer.write_group(group, tensors)
            tensors = {}
        group = group_of(name)
        tensors[name] = full
    if writer is not None:
        if tensors:
            writer.write_group(group, tensors)
        writer.close()
    dist.barrier()
