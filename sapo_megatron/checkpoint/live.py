"""Load into, and export from, a live (sharded) Megatron-Core model.

Loading: every rank walks its own parameters (and persistent buffers such as the router's
``expert_bias``), names each by its single-rank name (``sharding.global_name``), reads only those
full tensors, one layer at a time, and keeps its slice (``sharding.shard_full_tensor``). Nothing
is communicated, so it works at any TP/PP/EP layout. Sources: a sapo_megatron checkpoint
(:func:`load_into_model`) or an HF directory directly (:func:`load_hf_into_model`).

Export (:func:`export_plan`): all ranks agree on one global order of tensors (embedding,
layers, final), on who holds each (the ranks of data-parallel replica 0) and on each holder's
tensor-parallel slice. No full tensor is ever assembled: :meth:`ExportPlan.exchange` sends each
holder's part of each HF tensor (:mod:`.pieces`) straight to where it lands, a bucket slice or a
file buffer, on the parameters' device. Every rank walks the same order, so the point-to-point
operations cannot deadlock. :func:`export_hf` (weight sync to SGLang from disk) has each tensor
written by one of its holders into that rank's own shard files: all ranks write in parallel,
nothing funnels through rank 0. The distributed weight sync (``rollout/sglang/weight_sync``)
walks the same plan in buckets. :func:`save_from_model` (a sapo_megatron checkpoint) walks it
a group at a time, each group assembled and written by one of the ranks that hold it.

Every rank must call these functions (they are collective under torch.distributed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sapo_megatron.checkpoint.convert import check_hf_against_config
from sapo_megatron.checkpoint.hf_io import (
    INDEX,
    SINGLE,
    HFCheckpoint,
    PlannedShard,
    write_hf_config,
)
from sapo_megatron.checkpoint.mapping import (
    all_units,
    group_of,
    group_order,
    mapping_for,
    units_by_mcore_name,
)
from sapo_megatron.checkpoint.mcore_io import McoreCheckpoint, McoreCheckpointWriter, write_part
from sapo_megatron.checkpoint.pieces import (
    Layout,
    Piece,
    carve,
    piece_source,
    piece_target,
    place,
    plan_pieces,
)
from sapo_megatron.checkpoint.transforms import to_hf, to_mcore
from sapo_megatron.collectives import group_device
from sapo_megatron.mcore.te_names import local_norm_name
from sapo_megatron.step.sharding import global_name, shard_full_tensor, unwrap

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
    # Our names are the local spec's; a TE-spec model names its fused norms differently.
    return local_norm_name(global_name(inner, local_name))


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


def _held_tensors(model) -> dict[str, tuple]:
    """This rank's tensors by canonical name: ``{name: (module, local_name, tensor)}`` (a tied
    output layer is the embedding and is left out)."""
    local = {}
    for chunk in _chunks(model):
        inner = unwrap(chunk)
        tied = inner.share_embeddings_and_output_weights
        for local_name, tensor in _local_tensors(inner):
            name = _canonical(inner, local_name)
            if not (tied and name == "output_layer.weight"):
                local[name] = (inner, local_name, tensor)
    return local


# --------------------------------------------------------------------------- export plan
# Tensors the served checkpoint keeps in float32 whatever its torch_dtype: SGLang's DeepSeek-V3
# (and dots1) router holds e_score_correction_bias in fp32, as the released checkpoints do.
FP32_IN_CHECKPOINT = ("e_score_correction_bias",)


def checkpoint_dtype(hf_name: str, dtype: torch.dtype, hf_config: dict) -> torch.dtype:
    """The dtype an HF checkpoint of ``hf_config`` holds ``hf_name`` in (floats only change)."""
    if not dtype.is_floating_point:
        return dtype
    if hf_name.endswith(FP32_IN_CHECKPOINT):
        return torch.float32
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "").removeprefix("torch.")
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else dtype


@dataclasses.dataclass
class ExportEntry:
    """One full Megatron tensor of the export, the ranks that gather it and its HF tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    holders: list[int]  # the ranks of data-parallel replica 0 that hold it (they send it)
    unit: object  # mapping.Unit: HF names, HF shapes, conversion kind
    hf_dtypes: tuple[torch.dtype, ...]
    layouts: dict[int, Layout | None]  # each holder's (tp_rank, tp_size, dim) slice, None: full

    @property
    def hf(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return list(zip(self.unit.hf, self.hf_dtypes, self.unit.hf_shapes))

    @property
    def hf_nbytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for _, dt, shape in self.hf)


@dataclasses.dataclass
class ExportPlan:
    """The same on every rank: what exists, who holds it, what HF tensors it becomes."""

    entries: list[ExportEntry]
    local: dict[str, tuple]  # this rank's {name: (inner, local_name, tensor)}
    cfg: object
    hf_config: dict

    def pieces(self, entry: ExportEntry, dst: int) -> list[Piece]:
        return plan_pieces(entry.name, entry.unit.kind, entry.unit.hf_shapes, entry.holders, entry.layouts, dst)

    def exchange(self, entries: list[ExportEntry], dst: int | list[int],
                 dests: dict[str, torch.Tensor] | None, shared: frozenset[int] = frozenset()) -> Callable[[], None]:
        """Collective over the holders of ``entries`` and their destinations: every HF tensor of
        ``entries[k]`` lands in ``dests[hf_name]`` on rank ``dst`` (or ``dst[k]``); ``dests``
        holds views of a bucket or a file buffer (any device) for the entries this rank
        receives, in the export dtypes. Returns ``wait()``, which finishes the sends and receives.

        No full tensor is built: ``dst`` copies its own pieces once, straight from its
        parameters into ``dests``; every other holder sends its pieces (cast there, so a
        narrowing cast halves the bytes on the wire) and ``dst`` receives them in place when the
        destination is contiguous and on the group's device (else through one buffer). All
        sends and receives are posted at once (one ``batch_isend_irecv``, fused under NCCL).

        ``shared``: ranks that map the same memory as ``dst`` (an int then), e.g. a
        shared-memory bucket on ``dst``'s host: each writes its own pieces into its own
        ``dests`` (its views of that memory), and nothing is sent or received for them; the
        caller orders those writes against ``dst``'s use of the memory."""
        rank, device = dist.get_rank(), group_device()
        if shared and not isinstance(dst, int):
            raise ValueError(f"exchange: shared={sorted(shared)} needs one destination rank, got dst={dst}")
        dsts = [dst] * len(entries) if isinstance(dst, int) else dst
        ops, landing, wires = [], [], []
        with torch.no_grad():
            for entry, to in zip(entries, dsts, strict=True):
                for piece in self.pieces(entry, to):
                    hf_name, hf_dtype, _ = entry.hf[piece.hf]
                    if rank == piece.rank:
                        source = self._source(entry, piece)
                        if rank == to or rank in shared:
                            place(piece_target(piece, dests[hf_name]), source)
                        else:
                            wire = source.to(hf_dtype).contiguous()  # no copy when it already is
                            wires.append(wire)
                            ops.append(dist.P2POp(dist.isend, wire, to))
                    elif rank == to and piece.rank not in shared:
                        target = piece_target(piece, dests[hf_name])
                        if target.is_contiguous() and target.device == device:
                            buf = target
                        else:  # a column slice (row-parallel weight), or a host destination under NCCL
                            buf = torch.empty(target.shape, dtype=hf_dtype, device=device)
                            landing.append((target, buf))
                        ops.append(dist.P2POp(dist.irecv, buf, piece.rank))
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> None:
            for work in works:
                work.wait()
            with torch.no_grad():
                for target, buf in landing:
                    target.copy_(buf)
            wires.clear()

        return wait

    def _source(self, entry: ExportEntry, piece: Piece) -> torch.Tensor:
        _, _, tensor = self.local[entry.name]
        layout = entry.layouts.get(dist.get_rank())
        return piece_source(piece, entry.unit.kind, tensor.detach(), self.cfg, layout[1] if layout else 1)


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    shape = list(tensor.shape)
    layout = _slice_layout(tensor)
    if layout is not None:
        shape[layout[2]] *= layout[1]
    return tuple(shape)


def _slice_layout(tensor: torch.Tensor) -> Layout | None:
    from sapo_megatron.step.sharding import _tp_layout

    layout = _tp_layout(tensor)
    return None if layout is None else (layout[1], layout[2], layout[3])


def _in_replica_zero(tensor: torch.Tensor) -> bool:
    from megatron.core import parallel_state

    if not getattr(tensor, "allreduce", True):  # expert parameters
        return parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0


def export_plan(model, hf_config: dict, dtype: torch.dtype | str | None = "checkpoint") -> ExportPlan:
    """Collective (one object all-gather). ``dtype``: None keeps the model's dtypes, a dtype
    casts every float tensor, ``"checkpoint"`` casts as the served checkpoint holds them
    (:func:`checkpoint_dtype`)."""
    mapping = mapping_for(hf_config)
    cfg = mapping.config_from_hf(hf_config)
    by_mcore = {u.mcore: u for us in all_units(mapping, cfg).values() for u in us}
    local = _held_tensors(model)
    mine = {n: (str(t.dtype).removeprefix("torch."), _full_shape(t), _in_replica_zero(t), _slice_layout(t))
            for n, (_, _, t) in local.items()}
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, mine)
    info, holders, fallback, layouts = {}, defaultdict(list), defaultdict(list), defaultdict(dict)
    for rank, names in enumerate(held):
        for name, (dt, shape, zero, layout) in names.items():
            info.setdefault(name, (getattr(torch, dt), shape))
            fallback[name].append(rank)
            layouts[name][rank] = None if layout is None else tuple(layout)
            if zero:
                holders[name].append(rank)
    missing, extra = sorted(set(by_mcore) - set(info)), sorted(set(info) - set(by_mcore))
    if missing or extra:  # the same inputs on every rank: all raise together, no hang
        raise ValueError(f"export to {mapping.architecture}: model lacks {missing[:3]} and has unmapped {extra[:3]}")
    entries = []
    for name in sorted(info, key=lambda n: (group_order(group_of(n)), n)):
        dt, shape = info[name]
        unit = by_mcore[name]
        if dtype is None:
            hf_dtypes = (dt,) * len(unit.hf)
        elif dtype == "checkpoint":
            hf_dtypes = tuple(checkpoint_dtype(h, dt, hf_config) for h in unit.hf)
        else:
            hf_dtypes = tuple(dtype if dt.is_floating_point else dt for _ in unit.hf)
        entries.append(ExportEntry(name, tuple(shape), dt, holders[name] or fallback[name], unit, hf_dtypes,
                                   layouts[name]))
    return ExportPlan(entries, local, cfg, hf_config)


def _writer(entry: ExportEntry, k: int) -> int:
    return entry.holders[k % len(entry.holders)]


def _shard_layout(plan: ExportPlan, max_shard_bytes: int) -> tuple[dict[int, list[list[ExportEntry]]], list[str]]:
    """Which rank writes what: entry k goes to holder ``k % len(holders)`` (spreads the bytes
    over the TP ranks that all hold it after the gather); each rank cuts its entries into shards
    of at most ``max_shard_bytes``. Returns per-rank shard lists and the global file names."""
    per_rank: dict[int, list[list[ExportEntry]]] = defaultdict(list)
    size: dict[int, int] = defaultdict(int)
    for k, entry in enumerate(plan.entries):
        writer = _writer(entry, k)
        shards = per_rank[writer]
        if not shards or (shards[-1] and size[writer] + entry.hf_nbytes > max_shard_bytes):
            shards.append([])
            size[writer] = 0
        shards[-1].append(entry)
        size[writer] += entry.hf_nbytes
    total = sum(len(s) for s in per_rank.values())
    names = [SINGLE] if total == 1 else [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    return dict(sorted(per_rank.items())), names


_CHUNK = 64 * 1024**2  # HF bytes per exchange of the disk export (all writers together)


@dataclasses.dataclass
class _ChunkJobs:
    """One rank's part of writing one chunk of entries (:func:`_chunk_jobs`)."""

    metas: list  # host buffer slots: (name, dtype, shape), in aligned order
    local: list  # (entry, hf_name, source, byte offset, slot or None): this rank's own rows
    exchanged: list  # entries sent to their writer (column slices), and the writer of each
    exchanged_dst: list
    exchanged_here: list  # those of them this rank writes
    assembled: dict  # hf_name -> slot, for exchanged_here


def _chunk_jobs(plan: ExportPlan, chunk: list[ExportEntry], writers: list[int], rank: int) -> _ChunkJobs:
    slots: list = []
    local, exchanged, exchanged_dst, here, assembled = [], [], [], [], {}
    for entry, writer in zip(chunk, writers):
        pieces = plan.pieces(entry, writer)
        if any(p.dim not in (None, 0) for p in pieces):
            exchanged.append(entry)
            exchanged_dst.append(writer)
            if writer == rank:
                here.append(entry)
                for meta in entry.hf:
                    assembled[meta[0]] = len(slots)
                    slots.append(meta)
            continue
        for piece in pieces:
            if piece.rank != rank:
                continue
            hf_name, hf_dtype, shape = entry.hf[piece.hf]
            source = plan._source(entry, piece)
            rows = tuple(shape) if piece.dim is None else (piece.length, *shape[1:])
            offset = 0 if piece.dim is None else piece.start * math.prod(shape[1:]) * hf_dtype.itemsize
            slot = None
            if source.device.type != "cpu" or source.dtype != hf_dtype or not source.is_contiguous():
                slot = len(slots)
                slots.append((hf_name, hf_dtype, rows))
            local.append((entry, hf_name, source, offset, slot))
    order = sorted(range(len(slots)), key=lambda i: -slots[i][1].itemsize)  # aligns every slot
    where = {old: new for new, old in enumerate(order)}
    return _ChunkJobs([slots[i] for i in order],
                      [(e, h, src, off, None if slot is None else where[slot]) for e, h, src, off, slot in local],
                      exchanged, exchanged_dst, here, {h: where[slot] for h, slot in assembled.items()})


def plan_buckets(entries: list[ExportEntry], bucket_bytes: int) -> list[list[ExportEntry]]:
    """Consecutive export entries, at most ``bucket_bytes`` of HF bytes per bucket (an entry
    larger than that is a bucket of its own). The same on every rank."""
    out, size = [], 0
    for entry in entries:
        if not out or (out[-1] and size + entry.hf_nbytes > bucket_bytes):
            out.append([])
            size = 0
        out[-1].append(entry)
        size += entry.hf_nbytes
    return out


def export_hf(
    model,
    out_dir: str | os.PathLike,
    hf_config: dict,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    fsync: bool = False,
    timings: dict[str, float] | None = None,
) -> None:
    """Write the live model as HF safetensors + config.json; collective.

    No funnel: one of the ranks that hold a tensor writes it into its OWN shard files (the
    other TP holders send it their slices, :meth:`ExportPlan.exchange`), so every rank writes in
    parallel and nothing passes through one process.
    The file layout is computed from the plan alone, so rank 0 writes the index and config.json
    without asking anyone. ``fsync``: flush the shards to stable storage before returning.
    ``dtype``: see :func:`export_plan` (None keeps the model's dtypes). ``timings``: this rank's
    seconds per stage are added to it (plan, assemble: copies, sends and receives, write_wait:
    the background writer behind, close: flush and fsync).
    """
    clock = _Clock(timings)
    plan = export_plan(model, hf_config, dtype)
    clock.tick("plan_s")
    per_rank, names = _shard_layout(plan, max_shard_bytes)
    writer_index = [_writer(entry, k) for k, entry in enumerate(plan.entries)]
    rank, out = dist.get_rank(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = 0
    files: dict[str, str] = {}
    file_of: dict[str, tuple[Path, list]] = {}  # entry name -> (its file, the file's contents)
    owned: list[PlannedShard] = []
    for r, shards in per_rank.items():
        for shard in shards:
            file = names[first]
            first += 1
            files.update({h: file for e in shard for h, _, _ in e.hf})
            contents = [h for e in shard for h in e.hf]
            file_of.update({e.name: (out / file, contents) for e in shard})
            if r == rank:
                owned.append(PlannedShard(out / file, contents))
    shard_at: dict[Path, PlannedShard] = {s.path: s for s in owned}

    def shard_of(entry: ExportEntry) -> PlannedShard:
        path, contents = file_of[entry.name]
        if path not in shard_at:  # a file another rank owns, which this rank writes rows of
            shard_at[path] = PlannedShard(path, contents, owner=False)
        return shard_at[path]

    dist.barrier()  # every file exists before anyone writes rows into another rank's file
    clock.tick("plan_s")
    # Every byte is written by the rank that holds it, in place (``pwrite`` at its offset): rows
    # of a tensor-parallel slice along dim 0 are a contiguous byte range of the HF tensor, so
    # each TP rank writes its own rows into the writer's file and nothing crosses ranks. Only
    # column slices (row-parallel weights: dim 1) are sent to the writer, which assembles the
    # whole tensor. A source that is contiguous, on the host and in the export dtype is written
    # straight from the parameter; any other (QKV rows, a cast, a GPU tensor) is copied once into
    # a host buffer first. The entries go in chunks of about ``_CHUNK`` bytes (one exchange each);
    # two buffers and one background writer: chunk c + 1 is assembled while chunk c is written.
    chunks = plan_buckets(plan.entries, _CHUNK)
    index_of = {e.name: k for k, e in enumerate(plan.entries)}
    planned = [_chunk_jobs(plan, chunk, [writer_index[index_of[e.name]] for e in chunk], rank) for chunk in chunks]
    size = max((sum(math.prod(m[2]) * m[1].itemsize for m in p.metas) for p in planned), default=0)
    pin = group_device().type == "cuda"
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2 if size else 0)]
    with ThreadPoolExecutor(1, thread_name_prefix="hf-export") as io:
        pending = None
        for c, (chunk, job) in enumerate(zip(chunks, planned)):
            views = dict(zip(range(len(job.metas)), carve(buffers[c % 2], job.metas))) if job.metas else {}
            writes = []
            with torch.no_grad():
                for entry, hf_name, source, offset, slot in job.local:
                    if slot is not None:
                        place(views[slot], source)
                        source = views[slot]
                    writes.append((shard_of(entry), hf_name, source, offset))
            dests = {hf_name: views[slot] for hf_name, slot in job.assembled.items()}
            plan.exchange(job.exchanged, job.exchanged_dst, dests)()
            for entry in job.exchanged_here:
                writes += [(shard_of(entry), h, dests[h], 0) for h, _, _ in entry.hf]
            clock.tick("assemble_s")
            if pending is not None:  # chunk c - 1's writes read the other buffer
                pending.result()
            clock.tick("write_wait_s")
            pending = io.submit(lambda ws=writes: [sh.write(n, t, o) for sh, n, t, o in ws])
        if pending is not None:
            pending.result()
        clock.tick("write_wait_s")
    for sh in shard_at.values():
        if not sh.owner:
            sh.flush(fsync=fsync)
    dist.barrier()  # every co-writer is done with the files
    for sh in owned:
        sh.close(fsync=fsync)
    clock.tick("close_s")
    if rank == 0:
        if len(names) > 1:
            total = sum(e.hf_nbytes for e in plan.entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
            (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        write_hf_config(out, hf_config)
    dist.barrier()


class _Clock:
    """Adds the seconds since the last tick to ``timings[stage]`` (nothing when timings is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def tick(self, stage: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
            self.last = now


def _group_writers(groups: dict) -> dict:
    """One writer per group, spread over the ranks that hold it: the ``j``-th group a set of
    ranks holds goes to the ``j % n``-th of them (TP ranks, the ranks of a pipeline stage)."""
    seen: dict[tuple, int] = defaultdict(int)
    writers = {}
    for group, entries in groups.items():
        holders = tuple(sorted({r for e in entries for r in e.holders}))
        writers[group] = holders[seen[holders] % len(holders)]
        seen[holders] += 1
    return writers


def _rounds(writers: dict) -> list[list]:
    """Groups in rounds in which every rank writes at most one (all in parallel): round ``r``
    holds each rank's ``r``-th group, in group order. The same on every rank."""
    queues: dict[int, list] = defaultdict(list)
    for group, rank in writers.items():
        queues[rank].append(group)
    depth = max(map(len, queues.values()), default=0)
    return [[g for g in writers if g in {q[r] for q in queues.values() if r < len(q)}] for r in range(depth)]


def _landing(entry: ExportEntry, cfg) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The Megatron tensor of ``entry`` on its writer (host, empty) and where its HF tensors
    land: for ``copy`` and ``gate_up``, views of it (the gate and up halves are contiguous rows),
    so the pieces arrive in place; for ``qkv``, separate q/k/v buffers and no tensor yet
    (interleaved by query group once they are in: allocating the fused tensor only then, after
    the sends, keeps the peak lower than landing into its strided views)."""
    if entry.unit.kind == "qkv":
        return None, {h: torch.empty(shape, dtype=dt) for h, dt, shape in entry.hf}
    full = torch.empty(entry.shape, dtype=entry.dtype)
    return full, dict(zip(entry.unit.hf, to_hf(entry.unit.kind, full, cfg, views=True)))


def _write_round(plan: ExportPlan, ckpt_dir, jobs: list[tuple[int, list[ExportEntry]]], rank: int) -> None:
    """One round of :func:`save_from_model`: every ``(writer, group entries)`` assembled on its
    writer and written there (each rank writes at most one); collective."""
    entries = [e for _, group in jobs for e in group]
    mine = [e for writer, group in jobs if writer == rank for e in group]
    fused, dests = {}, {}
    for entry in mine:
        fused[entry.name], landing = _landing(entry, plan.cfg)
        dests.update(landing)
    plan.exchange(entries, [writer for writer, group in jobs for _ in group], dests)()
    if not mine:
        return
    tensors = {}
    for entry in mine:
        hf = [dests.pop(h) for h in entry.unit.hf]
        tensors[entry.name] = to_mcore(entry.unit.kind, hf, plan.cfg) if fused[entry.name] is None else fused[entry.name]
    write_part(ckpt_dir, group_of(mine[0].name), tensors)


def save_from_model(model, ckpt_dir: str | os.PathLike, hf_config: dict) -> None:
    """Write the live model as a sapo_megatron checkpoint; collective.

    The export plan of :func:`export_hf` with the model's dtypes, one writer per group (a layer,
    the embedding, the final norm and head): the holders send their pieces of each HF tensor
    to it (:meth:`ExportPlan.exchange`), straight into the Megatron tensors where the format
    allows (:func:`_landing`), and it writes the group as its own part
    (:func:`~sapo_megatron.checkpoint.mcore_io.write_part`). Writers of different ranks work in
    the same round, so a rank holds at most one group at a time and nothing passes through one
    process; rank 0 merges the parts' metadata at the end.
    """
    plan = export_plan(model, hf_config, dtype=None)
    groups: dict = defaultdict(list)
    for entry in plan.entries:  # already in group order
        groups[group_of(entry.name)].append(entry)
    writers = _group_writers(groups)
    rank = dist.get_rank()
    writer = None

    def open_writer():
        nonlocal writer
        if rank == 0:
            writer = McoreCheckpointWriter(ckpt_dir, architecture=mapping_for(hf_config).architecture,
                                           hf_config=hf_config, model_config=dataclasses.asdict(plan.cfg))

    def close_writer():
        if writer is not None:
            for group in groups:
                writer.adopt(group)
            writer.close()

    _together(open_writer)  # the directory exists before anyone writes a part
    for groups_now in _rounds(writers):
        _together(partial(_write_round, plan, ckpt_dir, [(writers[g], groups[g]) for g in groups_now], rank))
    _together(close_writer)  # after every part is written


def _together(step) -> None:
    """Run ``step`` on every rank; if it failed on any, every rank raises (the failing rank its
    own error, the others one naming it), so that a full disk on one writer leaves no rank
    waiting in the next collective; collective."""
    error = None
    try:
        step()
    except Exception as err:  # noqa: BLE001 - shared with every rank below, then raised
        error = err
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        raise RuntimeError(f"save_from_model: rank {failed[0]} failed ({failed[1]})")
