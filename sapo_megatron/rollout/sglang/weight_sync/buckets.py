"""Flattened buckets as SGLang's ``FlattenedTensorBucket`` reads them (pure functions).

SGLang (``sglang/srt/weight_sync/tensor_bucket.py``, 0.5.23) receives one uint8 tensor per
bucket and cuts it at offsets it computes from ``(names, dtypes, shapes)`` alone: tensor ``i``
starts where tensor ``i - 1`` ends, with no padding, and a tensor whose byte offset is not a
multiple of its dtype's itemsize is refused ("Unaligned received tensor"). Padding cannot be
sent, so alignment comes from the order: within a bucket, tensors go by decreasing itemsize
(8, 4, 2, 1 bytes; every size is a multiple of its own itemsize, so every offset is a multiple of
the next, smaller itemsize). That lets fp32 ``expert_bias`` and bf16 weights share a bucket.
"""

from __future__ import annotations

import math

import torch

from sapo_megatron.checkpoint.pieces import carve

Meta = tuple[str, torch.dtype, tuple[int, ...]]  # name, dtype, shape


def nbytes(meta: Meta) -> int:
    return math.prod(meta[2]) * meta[1].itemsize


def aligned_order(metas: list[Meta]) -> list[int]:
    """Indices of ``metas`` in the order that aligns every offset (stable within an itemsize)."""
    return sorted(range(len(metas)), key=lambda i: -metas[i][1].itemsize)


def offsets(metas: list[Meta]) -> list[int]:
    """Byte offset of each tensor as SGLang computes it; raises where SGLang would refuse."""
    out, offset = [], 0
    for name, dtype, shape in metas:
        if offset % dtype.itemsize:
            raise ValueError(f"bucket tensor {name!r} starts at byte {offset}, not a multiple of {dtype} "
                             f"itemsize {dtype.itemsize}: SGLang refuses unaligned buckets")
        out.append(offset)
        offset += math.prod(shape) * dtype.itemsize
    return out


def pack(tensors: list[tuple[str, torch.Tensor]], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` (already in aligned order) into one uint8 tensor
    on their device; ``out`` is reused when given and large enough. (The sync itself writes each
    tensor straight into its bucket view, ``checkpoint.pieces.carve``; this is the reference.)"""
    metas = [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    offsets(metas)  # refuses an unaligned order with SGLang's reason
    total = sum(map(nbytes, metas))
    device = tensors[0][1].device
    if out is None or out.numel() < total or out.device != device:
        out = torch.empty(total, dtype=torch.uint8, device=device)
    out = out[:total]
    for view, (_, t) in zip(carve(out, metas), tensors):
        view.copy_(t)
    return out
