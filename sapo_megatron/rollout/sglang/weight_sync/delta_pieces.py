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

Per cache-sized chunk: torch casts the parameters into a scratch buffer (the same cast as the
full sync's), then one compiled pass (:mod:`sapo_sglang.kernels`) compares bit patterns, lists
the changed positions and updates the copy; without a C compiler, numpy does it in three passes
(compare, flatnonzero, copy), about half as fast. No full-tensor temporaries, no per-element
Python. The encoding of each part is the codec's choice by size
(:func:`sapo_sglang.delta_loader.encoding_sizes`): changed indices, uint8 gaps (built by the
compiled kernel when there is one) or a bitmap, each with the values, or the whole part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time

import numpy as np
import torch

from sapo_megatron.checkpoint.hf_io import fsync_path
from sapo_sglang import delta_loader as codec
from sapo_sglang import kernels as native

CHUNK_ELEMENTS = 1 << 18  # per cast-and-compare step: ~1 MB of fp32 source, cache-resident
KEEP_POSITIONS = 1 << 23  # the compiled diff's positions buffer is kept up to 64 MB between parts



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


def _plain_torch(source: torch.Tensor):
    """No ``__torch_function__`` overrides for the diff's few thousand small tensor calls when
    ``source`` is a plain tensor: the CPU compatibility layer's mode (:mod:`sapo_megatron.mcore.cpu`)
    costs ~2 us per call, a sixth of the diff on a CPU host. A tensor subclass keeps its overrides."""
    if type(source) in (torch.Tensor, torch.nn.Parameter):
        return torch._C.DisableTorchFunction()
    return contextlib.nullcontext()


class PieceDiffer:
    """The copies of this rank's parts as the servers hold them, and the diff against them."""

    def __init__(self, kernels: native.DeltaKernels | None | str = "auto") -> None:
        self.held: dict[str, torch.Tensor] = {}  # key -> flat, contiguous, served dtype (host)
        self._scratch = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.uint8)
        self._mask = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.bool)
        self._positions = np.empty(CHUNK_ELEMENTS, dtype=np.int64)  # the compiled diff's output, grown
        self.kernels = native.delta_kernels() if kernels == "auto" else kernels  # None: numpy

    def _room(self, k: int, n: int) -> np.ndarray:
        """The positions buffer with room for ``n`` more after its first ``k`` (kept)."""
        if self._positions.size < k + n:
            grown = np.empty(max(2 * self._positions.size, k + n), dtype=np.int64)
            grown[:k] = self._positions[:k]
            self._positions = grown
        return self._positions

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
        kernels = self.kernels if held.element_size() in native.DeltaKernels.WIDTHS else None
        found, k = [], 0
        with torch.no_grad(), _plain_torch(piece.source):
            for row, rows, offset in row_blocks(piece.source):
                src = piece.source.narrow(0, row, rows) if piece.source.dim() else piece.source
                n = src.numel()
                new = self._scratch_for(piece.dtype, n)[:n]
                new.view(src.shape).copy_(src)  # the cast to the served dtype
                new_ints, old_ints = new.view(ints.dtype), ints[offset : offset + n]
                if kernels is not None:  # compare, list and update in one pass
                    out = self._room(k, n)
                    k += kernels.diff(new_ints, old_ints, offset, out[k:])
                    continue
                mask = self._mask[:n]
                torch.ne(new_ints, old_ints, out=mask)
                where = np.flatnonzero(mask.numpy())
                if where.size:
                    where += offset
                    found.append(where)
                    old_ints.copy_(new_ints)
        positions = self._positions[:k] if kernels is not None else (np.concatenate(found) if found else found)
        if not len(positions):
            return {}
        try:
            return encode(piece.name, held.view(piece.shape), positions, kernels)
        finally:
            if self._positions.size > KEEP_POSITIONS:  # a dense change of a huge part: not kept for good
                self._positions = np.empty(CHUNK_ELEMENTS, dtype=np.int64)

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


def encode(name: str, new: torch.Tensor, positions: np.ndarray,
           kernels: native.DeltaKernels | None) -> dict[str, torch.Tensor]:
    """The codec's smallest encoding of ``new`` given its changed ``positions``
    (:func:`sapo_sglang.delta_loader.encode_positions`, whose choice and output this equals); the
    gap encoding, the usual winner, is built by the compiled kernel when there is one."""
    if kernels is None or new.element_size() not in native.DeltaKernels.WIDTHS:
        return codec.encode_positions(name, new, positions)
    bridged = kernels.gap_count(positions, codec.MAX_GAP)
    sizes = codec.encoding_sizes(new.numel(), new.element_size(), positions.size, bridged)
    if min(sizes, key=sizes.get) != codec.GAP:
        return codec.encode_positions(name, new, positions)
    gaps, values = kernels.gap_encode(positions, codec._bits(new), bridged, codec.MAX_GAP)
    return {name + codec.GAP: torch.from_numpy(gaps), name + codec.VALUES: torch.from_numpy(values).view(new.dtype)}


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
        fsync_path(path)
    if timings is not None:
        timings["file_s"] = timings.get("file_s", 0.0) + time.perf_counter() - t1
    return path, codec.encoded_nbytes(parts), full, (differ.digests(pieces) if check else None)
