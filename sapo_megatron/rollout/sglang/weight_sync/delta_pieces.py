"""The delta sync's trainer side, shard-local: each rank diffs its OWN slices, nothing is exchanged.

Why: a delta needs, per HF tensor, what the servers hold and what the trainer has now. Gathering
each tensor on one rank first (the disk export's path) moves (TP - 1) / TP of the model between
ranks at every push only to find that ~90 % of it did not change. Instead every rank keeps, for
each part of an HF tensor it holds (:mod:`sapo_megatron.checkpoint.pieces`: a run of rows of a
column-parallel slice, of QKV's query groups, of gate/up; a run of columns of a row-parallel
slice; a whole replicated tensor on one of its holders), that part as last sent, in the served
dtype, in host memory. A push casts each part from the parameters into a small scratch buffer,
compares bit patterns with the copy, and records the changed elements; the copy then takes the
new values. Each rank writes its parts to its own delta file, with each part's region of its HF
tensor (``(dim, start, length)``) in the file's metadata; the server's loader
(:func:`sapo_sglang.delta_loader.apply_parts`) applies each region to its HF copy.

Work per element is three passes over a cache-sized chunk (the cast, the compare, the changed
positions): no full-tensor temporaries, no per-element Python. The encoding of each part is the
codec's, chosen by size (:func:`sapo_sglang.delta_loader.encode_positions`): changed indices,
uint8 gaps or a bitmap, each with the values, or the whole part.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

from sapo_sglang import delta_loader as codec

CHUNK_ELEMENTS = 1 << 18  # per cast-and-compare step: ~1 MB of fp32 source, cache-resident



@dataclasses.dataclass
class LocalPiece:
    """One part of one HF tensor that this rank holds and diffs."""

    name: str  # the HF tensor
    region: tuple[int, int, int] | None  # (dim, start, length) of the HF tensor; None: all of it
    source: torch.Tensor  # a view of the parameter (maybe strided, maybe another dtype)
    dtype: torch.dtype  # the served dtype
    shape: tuple[int, ...]  # the region's shape

    @property
    def key(self) -> str:
        return codec.region_key(self.name, self.region)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def local_pieces(plan, rank: int) -> list[LocalPiece]:
    """This rank's parts of every HF tensor of the export plan: the pieces it would send to the
    tensor's writer (a replicated tensor: the holder ``k % holders`` for the ``k``-th entry, as
    the disk export spreads them). The same plan on every rank gives disjoint parts that cover
    every HF tensor exactly once."""
    out = []
    for k, entry in enumerate(plan.entries):
        dst = entry.holders[k % len(entry.holders)]
        for piece in plan.pieces(entry, dst):
            if piece.rank != rank:
                continue
            name, dtype, shape = entry.hf[piece.hf]
            shape = list(shape)
            region = None
            if piece.dim is not None:
                region = (piece.dim, piece.start, piece.length)
                shape[piece.dim] = piece.length
            out.append(LocalPiece(name, region, plan._source(entry, piece), dtype, tuple(shape)))
    return out


def row_blocks(source: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first row, rows, element offset)`` blocks of about :data:`CHUNK_ELEMENTS` along dim 0."""
    if source.dim() == 0:
        return [(0, 1, 0)]
    inner = math.prod(source.shape[1:])
    rows = max(1, CHUNK_ELEMENTS // max(inner, 1))
    return [(r, min(rows, source.shape[0] - r), r * inner) for r in range(0, source.shape[0], rows)]


class PieceDiffer:
    """The copies of this rank's parts as the servers hold them, and the diff against them."""

    def __init__(self) -> None:
        self.held: dict[str, torch.Tensor] = {}  # key -> flat, contiguous, served dtype (host)
        self._scratch = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.uint8)
        self._mask = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.bool)

    def _scratch_for(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if self._scratch.numel() < n * dtype.itemsize:
            self._scratch = torch.empty(n * dtype.itemsize, dtype=torch.uint8)
        if self._mask.numel() < n:
            self._mask = torch.empty(n, dtype=torch.bool)
        return self._scratch[: n * dtype.itemsize].view(dtype)

    def refresh(self, pieces: list[LocalPiece]) -> None:
        """The copies become the parameters as they are now (after a full sync)."""
        old, self.held = self.held, {}
        for p in pieces:
            self.refresh_one(p, reuse=old.get(p.key))

    def diff(self, piece: LocalPiece) -> dict[str, torch.Tensor]:
        """The codec's parts for ``piece`` (``{}``: unchanged) and the copy updated to the new
        values. A part is its region's bits in row-major order: ``@idx`` indices count from the
        region's first element."""
        held = self.held.get(piece.key)
        if held is None:  # a part the servers got in the last full sync but we never kept: send it
            self.refresh_one(piece)
            return {piece.name + codec.FULL: self.held[piece.key].view(piece.shape)}
        ints = held.view(codec.INT_OF[held.element_size()])
        found = []
        for row, rows, offset in row_blocks(piece.source):
            src = piece.source.narrow(0, row, rows) if piece.source.dim() else piece.source
            n = src.numel()
            new = self._scratch_for(piece.dtype, n)[:n]
            with torch.no_grad():
                new.view(src.shape).copy_(src)  # the cast to the served dtype
            new_ints, old_ints = new.view(ints.dtype), ints[offset : offset + n]
            mask = self._mask[:n]
            torch.ne(new_ints, old_ints, out=mask)
            where = np.flatnonzero(mask.numpy())
            if where.size:
                where += offset
                found.append(where)
                old_ints.copy_(new_ints)
        if not found:
            return {}
        return codec.encode_positions(piece.name, held.view(piece.shape), np.concatenate(found))

    def refresh_one(self, piece: LocalPiece, reuse: torch.Tensor | None = None) -> None:
        """This part's copy becomes the parameters as they are now (in ``reuse`` when it fits)."""
        held = reuse
        if held is None or held.numel() != piece.numel or held.dtype != piece.dtype:
            held = torch.empty(piece.numel, dtype=piece.dtype)
        with torch.no_grad():
            held.view(piece.source.shape).copy_(piece.source)
        self.held[piece.key] = held

    def digests(self, pieces: list[LocalPiece]) -> dict[str, str]:
        """blake2b of each part's copy, keyed as the server keys its regions."""
        return {p.key: codec.digest(self.held[p.key].view(p.shape)) for p in pieces}


def write_delta(path: str, differ: PieceDiffer, pieces: list[LocalPiece], *, check: bool,
                fsync: bool = False, timings: dict | None = None) -> tuple[str | None, int, int, dict | None]:
    """Diff this rank's parts and write them to ``path`` (safetensors; the regions in its
    metadata, and with ``check`` every region this rank holds, for the servers' digests;
    ``fsync``: flushed to stable storage, as the full sync's files then are).
    Returns ``(path or None when there was nothing to write, encoded bytes, full bytes of the
    parts, this rank's digests when check)``. ``timings``: seconds of ``diff_s`` and ``file_s`` added."""
    t0 = time.perf_counter()
    parts: dict[str, torch.Tensor] = {}
    regions: dict[str, list] = {}
    for piece in pieces:
        mine = differ.diff(piece)
        parts.update(mine)
        if mine and piece.region is not None:
            regions[piece.name] = list(piece.region)
    full = sum(p.numel * p.dtype.itemsize for p in pieces)
    t1 = time.perf_counter()
    if timings is not None:
        timings["diff_s"] = timings.get("diff_s", 0.0) + t1 - t0
    if not parts and not (check and pieces):
        return None, 0, full, ({} if check else None)
    from safetensors.torch import save_file

    meta = {"regions": json.dumps(regions)}
    if check:
        meta["pieces"] = json.dumps({p.key: [p.name, p.region] for p in pieces})
    save_file(parts, path, metadata=meta)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if timings is not None:
        timings["file_s"] = timings.get("file_s", 0.0) + time.perf_counter() - t1
    return path, codec.encoded_nbytes(parts), full, (differ.digests(pieces) if check else None)
