"""Which rank holds which part of which HF tensor: the export's data path, as pure functions.

An export (to disk, or to SGLang in buckets) needs each HF tensor in ONE place: a bucket slice
or a file buffer on one rank. Gathering the full Megatron tensor first (``all_gather`` + ``cat``)
and then splitting it into HF tensors (QKV, gate/up) copies every byte two or three times. Here
instead every holder of a tensor-parallel slice knows where its own part of each HF tensor goes
(``to_hf(..., shards=T)`` of its slice is a contiguous run of rows of the HF tensor, see
:mod:`.transforms`), so it sends exactly that part, and the receiver lands it in place: one copy
per byte, or none when a receive can write straight into the destination.

A :class:`Piece` is ``dest.narrow(dim, start, length)`` of HF tensor ``hf``, held by ``rank``.
Nothing here communicates; :meth:`sapo_megatron.checkpoint.live.ExportPlan.exchange` does.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sapo_megatron.checkpoint.transforms import to_hf

Layout = tuple[int, int, int]  # (tp_rank, tp_size, partition dim) of one holder's slice


@dataclasses.dataclass(frozen=True)
class Piece:
    rank: int  # the holder that sends it
    hf: int  # index of the HF tensor among the unit's
    dim: int | None  # None: the whole HF tensor
    start: int = 0
    length: int = 0


def plan_pieces(name: str, kind: str, hf_shapes, holders: list[int], layouts: dict[int, Layout | None],
                dst: int) -> list[Piece]:
    """The pieces that make up the HF tensors of one Megatron tensor, to be assembled on ``dst``.

    Unsharded (every holder has the full tensor): one holder sends everything, ``dst`` itself
    when it holds it. Sharded: tensor-parallel rank ``r`` sends rows ``[r * n, (r + 1) * n)``
    of every HF tensor along the partition dim (``n`` = HF size / T)."""
    sharded = {h: layouts.get(h) for h in holders if layouts.get(h) is not None}
    if not sharded:
        owner = dst if dst in holders else holders[0]
        return [Piece(owner, i, None) for i in range(len(hf_shapes))]
    if len(sharded) != len(holders) or len({(t, d) for _, t, d in sharded.values()}) != 1:
        raise ValueError(f"export of {name!r}: holders {holders} disagree on its tensor-parallel layout {layouts}")
    _, size, dim = next(iter(sharded.values()))
    by_tp_rank = {r: h for h, (r, _, _) in sharded.items()}
    if sorted(by_tp_rank) != list(range(size)) or len(by_tp_rank) != len(holders):
        raise ValueError(f"export of {name!r}: expected one holder per tensor-parallel rank 0..{size - 1}, "
                         f"got {sharded}")
    if kind != "copy" and dim != 0:
        raise ValueError(f"export of {name!r}: a {kind!r} tensor split along dim {dim}; only dim 0 is supported")
    out = []
    for r in range(size):
        for i, shape in enumerate(hf_shapes):
            if shape[dim] % size:
                raise ValueError(f"export of {name!r}: HF dim {dim} of size {shape[dim]} does not split in {size}")
            n = shape[dim] // size
            out.append(Piece(by_tp_rank[r], i, dim, r * n, n))
    return out


def piece_source(piece: Piece, kind: str, local: torch.Tensor, cfg, tp_size: int) -> torch.Tensor:
    """The holder's view of ``piece`` in its local tensor (no copy; maybe strided)."""
    return to_hf(kind, local, cfg, views=True, shards=tp_size if piece.dim is not None else 1)[piece.hf]


def piece_target(piece: Piece, dest: torch.Tensor) -> torch.Tensor:
    """Where ``piece`` lands in ``dest``, its HF tensor (a view)."""
    return dest if piece.dim is None else dest.narrow(piece.dim, piece.start, piece.length)


def piece_nbytes(piece: Piece, shape, dtype: torch.dtype) -> int:
    """Bytes of ``piece`` of an HF tensor of ``shape`` and ``dtype``."""
    rows = list(shape)
    if piece.dim is not None:
        rows[piece.dim] = piece.length
    return math.prod(rows) * dtype.itemsize


def place(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` (casting, maybe across devices); a QKV source view is
    ``(groups, rows, hidden)`` over the same elements as the row-major ``target``."""
    if target.shape != source.shape:
        target = target.view(source.shape)
    target.copy_(source)


def carve(buffer: torch.Tensor, metas) -> list[torch.Tensor]:
    """Views of the uint8 ``buffer``, one per ``(name, dtype, shape)``, back to back with no
    padding (SGLang's flattened-bucket layout, and a safetensors file's data section); a tensor
    whose offset is not a multiple of its itemsize is refused (order metas by itemsize first)."""
    out, offset = [], 0
    for name, dtype, shape in metas:
        if offset % dtype.itemsize:
            raise ValueError(f"tensor {name!r} would start at byte {offset}, not a multiple of {dtype} "
                             f"itemsize {dtype.itemsize}")
        n = math.prod(shape) * dtype.itemsize
        out.append(buffer[offset : offset + n].view(dtype).view(shape))
        offset += n
    return out
