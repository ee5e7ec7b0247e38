"""Scalar and metric reductions whose tensors live where their process group needs them.

A collective's tensors must sit on the device of the group's backend: CUDA (the current
device) for NCCL, CPU for gloo. ``torch.tensor([...])`` builds on the host, which gloo accepts
and NCCL refuses ("Tensors must be CUDA and dense"), even at world size 1. Code that counts
tokens, sums rewards or reduces metrics therefore goes through the helpers below and never
builds a raw tensor for a collective itself; ``tests/test_devices.py`` scans the package for
call sites that do.

Every helper is a no-op reduction (values returned as given) without torch.distributed, so
single-process code and unit tests call them unconditionally.

Usage::

    from sapo_megatron.collectives import all_reduce_values, all_reduce_tensor
    tokens, sequences = all_reduce_values([tokens, sequences], group=dp_group)
    table = all_reduce_tensor(table_on_cpu, op="max", group=group)   # back on its own device
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
# Backends whose collectives take CUDA tensors. A group created with several backends reports
# them as "cpu:gloo,cuda:nccl"; it takes CUDA tensors too, so CUDA is the safe choice there.
_CUDA_BACKENDS = ("nccl", "cuda:")


def group_device(group=None) -> torch.device:
    """The device a collective over ``group`` (None: the default group) needs its tensors on."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if any(name in backend for name in _CUDA_BACKENDS):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _op(op: str):
    if op not in _OPS:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {sorted(_OPS)}")
    return getattr(dist.ReduceOp, _OPS[op])


def all_reduce_tensor(tensor: torch.Tensor, *, op: str = "sum", group=None) -> torch.Tensor:
    """``tensor`` all-reduced over ``group``, returned on ``tensor``'s own device and dtype.

    The input is not modified; it is copied to the group's device when it lives elsewhere.
    """
    reduce_op = _op(op)
    if not dist.is_initialized():
        return tensor.clone()
    device = group_device(group)
    work = tensor.detach().to(device=device, copy=True).contiguous()
    dist.all_reduce(work, op=reduce_op, group=group)
    return work.to(tensor.device)


def all_reduce_values(
    values: Sequence[float | int], *, op: str = "sum", group=None, dtype: torch.dtype = torch.float64
) -> list[float]:
    """Python numbers reduced over ``group`` in one collective (float64 keeps counts exact
    up to 2**53)."""
    reduce_op = _op(op)
    if not dist.is_initialized():
        return [float(v) for v in values]
    work = torch.tensor([float(v) for v in values], dtype=dtype, device=group_device(group))
    dist.all_reduce(work, op=reduce_op, group=group)
    return work.tolist()


def all_reduce_dict(table: Mapping[str, float], *, op: str = "sum", group=None) -> dict[str, float]:
    """A ``{name: number}`` table reduced over ``group`` (names in sorted order on every rank)."""
    names = sorted(table)
    if not names:
        return {}
    return dict(zip(names, all_reduce_values([table[n] for n in names], op=op, group=group)))


def global_max(value: float | int, *, group=None) -> float:
    """The largest ``value`` over ``group``."""
    return all_reduce_values([value], op="max", group=group)[0]


def on_group_device(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` on the device ``group`` needs, for point-to-point sends and receives
    (unchanged when it is already there)."""
    return tensor.to(group_device(group))
