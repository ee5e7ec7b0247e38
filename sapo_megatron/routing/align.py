"""Put per-sample routes in exactly the order Megatron-Core's routers see tokens.

Pure tensor functions, no process groups: the distributed wrappers pass their ranks in.

Row convention: row ``r`` of a sample's routes is the routing of input token ``r``. SGLang
reports tokens ``0 .. N-2`` of a sample of ``N`` tokens (the last token ``N-1`` is never fed
through its model), so the training forward, which does feed it, has no route for it: the
alignment gives it a placeholder row of distinct ids and marks it not-replayed; that token
routes live and is counted as a fallback.

Layouts (those of ``sapo_megatron.step.batch``): padded ``[B, S]`` (sample ``b`` in row
``b``, tokens ``[0, N_b)``, right padding) and packed ``[1, T]`` (samples back to back from 0,
padding at the end). Megatron's router receives hidden states ``[S, B, H]`` flattened
sequence-major, so token ``(b, s)`` is router row ``s * B + b``; routes are therefore laid out
``routes_SBMK`` (``M`` = MoE layers, ``K`` = top-k) and :func:`layer_targets` flattens one
layer to ``[S * B, K]``.

Three kinds of token, told apart by two masks ``[S, B]``:
- replayed (``replay_mask``): the rollout's routing, to be forced and compared in metrics;
- fallback (neither mask): the last token of a sample, routed live, counted as a fallback;
- padding (``pad_mask``): ids ``arange(topk)`` - distinct, since duplicate ids break the
  alltoall dispatcher's split sizes - excluded from load-balancing statistics and metrics.

Sharding, in the order training applies it: context parallel first (:func:`cp_slice` for
padded batches, :func:`cp_slice_thd` for packed THD), then the sequence-parallel split of what
is left (:func:`sp_slice`), then the layers of the pipeline stage (:func:`stage_moe_layers`).
Routes stay in their compact dtype throughout; :func:`layer_targets` widens to int64 last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sapo_megatron.models.config import pipeline_stage_layers
from sapo_megatron.routing.compact import moe_layer_pattern


def pad_routes(num_tokens: int, num_moe_layers: int, topk: int, dtype=torch.uint8) -> torch.Tensor:
    """``[num_tokens, M, K]`` of ``arange(topk)``: distinct ids for tokens without routes
    (padding, placeholders)."""
    row = torch.arange(topk, dtype=dtype)
    return row.expand(num_tokens, num_moe_layers, topk)


def _check_samples(per_sample_routes: Sequence[torch.Tensor], topk: int) -> tuple[int, torch.dtype]:
    if not per_sample_routes:
        raise ValueError("need the routes of at least one sample")
    first = per_sample_routes[0]
    for i, routes in enumerate(per_sample_routes):
        if routes.dim() != 3 or routes.shape[1:] != first.shape[1:] or routes.shape[2] != topk:
            raise ValueError(
                f"routes of sample {i} have shape {tuple(routes.shape)}, expected "
                f"[rows, {first.shape[1]}, topk {topk}]"
            )
        if routes.dtype != first.dtype:
            raise ValueError(f"routes of sample {i} are {routes.dtype}, sample 0's {first.dtype}")
    return first.shape[1], first.dtype


def _shard_bounds(seq_length: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"sequence-parallel shard {tp_rank} does not exist: tp_rank must be in [0, tp_size={tp_size})")
    if seq_length % tp_size:
        raise ValueError(
            f"cannot take sequence-parallel shard {tp_rank} of {tp_size} from a sequence of "
            f"{seq_length} tokens: the length must be a multiple of the TP size (pad_multiple)"
        )
    chunk = seq_length // tp_size
    return tp_rank * chunk, (tp_rank + 1) * chunk


def _fill_shard(
    per_sample_routes: Sequence[torch.Tensor],
    starts: Sequence[int],
    columns: Sequence[int],
    seq_length: int,
    *,
    topk: int,
    tp_rank: int,
    tp_size: int,
    slots: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write each sample (tokens ``start .. start + rows`` of column ``b``) into one shard.

    Only the tokens of this sequence-parallel shard and the requested layer ``slots`` are ever
    copied, so the cost and the memory are those of the shard, not of the microbatch.
    """
    num_moe_layers, dtype = _check_samples(per_sample_routes, topk)
    lo, hi = _shard_bounds(seq_length, tp_rank, tp_size)
    slot_list = list(range(num_moe_layers)) if slots is None else list(slots)
    width = max(columns) + 1
    routes = torch.empty(hi - lo, width, len(slot_list), topk, dtype=dtype)
    routes.copy_(torch.arange(topk, dtype=dtype).expand_as(routes))
    replay = torch.zeros(hi - lo, width, dtype=torch.bool)
    pad = torch.ones(hi - lo, width, dtype=torch.bool)
    # A pipeline stage's MoE layers are consecutive slots: a plain slice avoids a gather.
    contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list))) if slot_list else True
    pick = slice(slot_list[0], slot_list[0] + len(slot_list)) if slot_list and contiguous else slot_list
    for i, (sample, start, column) in enumerate(zip(per_sample_routes, starts, columns)):
        rows = sample.shape[0]
        if start + rows + 1 > seq_length:
            where = f" from position {start}" if start else ""
            raise ValueError(
                f"sample {i} has {rows + 1} tokens ({rows} route rows + 1){where}, more than "
                f"seq_length {seq_length}"
            )
        # Replayed tokens [start, start + rows), the fallback token right after, then padding.
        a, b = max(start, lo), min(start + rows, hi)
        if b > a:
            part = sample[a - start : b - start]
            routes[a - lo : b - lo, column] = part[:, pick]
            replay[a - lo : b - lo, column] = True
        a, b = max(start, lo), min(start + rows + 1, hi)
        if b > a:
            pad[a - lo : b - lo, column] = False
    return routes, replay, pad


def align_padded(
    per_sample_routes: Sequence[torch.Tensor],
    seq_length: int,
    *,
    topk: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    slots: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes of samples right-padded to ``seq_length`` (``collate_padded``'s layout).

    ``per_sample_routes[b]`` is ``[N_b - 1, M, K]`` (tokens ``0 .. N_b - 2``). Returns
    ``(routes_SBMK, replay_mask_SB, pad_mask_SB)``; with ``tp_size > 1`` only the
    sequence-parallel shard of ``tp_rank`` (``S / tp_size`` tokens), and with ``slots`` only
    those MoE layers, are built (equal to slicing the full result, without building it).
    """
    batch = len(per_sample_routes)
    return _fill_shard(
        per_sample_routes, [0] * batch, list(range(batch)), seq_length,
        topk=topk, tp_rank=tp_rank, tp_size=tp_size, slots=slots,
    )


def packed_cu_seqlens(
    lengths: Sequence[int], total_length: int, *, sample_multiple: int = 1
) -> torch.Tensor:
    """Segment bounds (int32) of the packed layout: each sample's length rounded up to
    ``sample_multiple``, then the trailing padding as a segment of its own. The samples' starts
    are ``collate_packed``'s; its ``cu_seqlens_padded`` instead gives the trailing padding to
    the last sample's segment (the same positions, so the routes align either way)."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + -(-length // sample_multiple) * sample_multiple)
    if bounds[-1] > total_length:
        raise ValueError(
            f"samples of lengths {list(lengths)} (each rounded up to {sample_multiple}) take "
            f"{bounds[-1]} tokens, more than total_length {total_length}"
        )
    if total_length > bounds[-1]:
        bounds.append(total_length)
    return torch.tensor(bounds, dtype=torch.int32)


def align_packed(
    per_sample_routes: Sequence[torch.Tensor],
    total_length: int,
    *,
    topk: int,
    sample_multiple: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    slots: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes of samples packed into one row of ``total_length`` (``collate_packed``'s layout).

    Returns ``(routes_SBMK, replay_mask_SB, pad_mask_SB)`` with ``B = 1``. ``sample_multiple``
    rounds each sample up (with padding tokens) as THD context parallelism requires (a multiple
    of ``2 * cp``); ``collate_packed`` uses 1 today. ``tp_rank`` / ``tp_size`` / ``slots`` as in
    :func:`align_padded`.
    """
    _check_samples(per_sample_routes, topk)
    lengths = [r.shape[0] + 1 for r in per_sample_routes]
    bounds = packed_cu_seqlens(lengths, total_length, sample_multiple=sample_multiple).tolist()
    return _fill_shard(
        per_sample_routes, bounds[: len(lengths)], [0] * len(lengths), total_length,
        topk=topk, tp_rank=tp_rank, tp_size=tp_size, slots=slots,
    )


def sp_slice(x: torch.Tensor, tp_rank: int, tp_size: int, seq_dim: int = 0) -> torch.Tensor:
    """Sequence-parallel shard: the ``tp_rank``-th contiguous chunk of ``seq_dim`` (Megatron's
    ``scatter_to_sequence_parallel_region`` splits the ``[S, B, H]`` input along S)."""
    lo, hi = _shard_bounds(x.shape[seq_dim], tp_rank, tp_size)
    return x.narrow(seq_dim, lo, hi - lo)


def cp_slice(x: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 0) -> torch.Tensor:
    """Context-parallel shard of a padded batch, as ``megatron.core.utils.
    get_batch_on_this_cp_rank``: ``seq_dim`` cut into ``2 * cp_size`` chunks, rank ``r`` keeps
    chunks ``r`` and ``2 * cp_size - 1 - r`` (balances causal attention work)."""
    length = x.shape[seq_dim]
    if not 0 <= cp_rank < cp_size or length % (2 * cp_size):
        raise ValueError(
            f"cannot take context-parallel shard {cp_rank} of {cp_size} from a sequence of "
            f"{length} tokens: the length must be a multiple of 2 x CP = {2 * cp_size}"
        )
    if cp_size == 1:
        return x
    chunk = length // (2 * cp_size)
    return torch.cat(
        [
            x.narrow(seq_dim, cp_rank * chunk, chunk),
            x.narrow(seq_dim, (2 * cp_size - 1 - cp_rank) * chunk, chunk),
        ],
        dim=seq_dim,
    )


def thd_cp_indices(cu_seqlens_padded: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Token indices a CP rank keeps from a packed THD row, in Transformer Engine's convention
    (``thd_get_partitioned_indices``): every segment (a multiple of ``2 * cp_size`` long) is cut
    into ``2 * cp_size`` chunks and rank ``r`` keeps chunks ``r`` and ``2 * cp_size - 1 - r`` of
    each, segment after segment."""
    bounds = [int(v) for v in cu_seqlens_padded]
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    pieces = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"packed segment {i} spans {end - start} tokens, not a multiple of 2 x CP = "
                f"{2 * cp_size}: pad each sample (sample_multiple) for THD context parallelism"
            )
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def cp_slice_thd(
    x: torch.Tensor, cu_seqlens_padded: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 0
) -> torch.Tensor:
    """Context-parallel shard of a packed THD row (see :func:`thd_cp_indices`)."""
    if int(cu_seqlens_padded[-1]) != x.shape[seq_dim]:
        raise ValueError(
            f"cu_seqlens_padded ends at {int(cu_seqlens_padded[-1])}, the packed row has "
            f"{x.shape[seq_dim]} tokens"
        )
    if cp_size == 1:
        return x
    return x.index_select(seq_dim, thd_cp_indices(cu_seqlens_padded, cp_rank, cp_size))


def stage_layer_range(
    num_layers: int,
    *,
    pp_size: int,
    pp_rank: int,
    vpp_size: int | None = None,
    vp_stage: int | None = None,
    num_layers_in_first_stage: int | None = None,
    num_layers_in_last_stage: int | None = None,
) -> range:
    """Global layer indices built on pipeline rank ``pp_rank`` (virtual stage ``vp_stage``).

    Computed independently of Megatron-Core (and tested against its
    ``get_transformer_layer_offset`` / ``get_num_layers_to_build``): every pipeline rank
    holds a number of layers (``models.config.pipeline_stage_layers``: the uneven first/last
    counts, the rest split evenly), each rank's
    share is cut into ``vpp_size`` equal chunks, and the layers are dealt out chunk by chunk in
    the order virtual stage 0 of ranks 0..pp-1, then virtual stage 1, ... Custom
    ``pipeline_model_parallel_layout`` strings and embedding/loss stages are not supported.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, pp_size {pp_size})")
    vpp = vpp_size or 1
    stage = vp_stage or 0
    if not 0 <= stage < vpp:
        raise ValueError(f"vp_stage {vp_stage} is outside [0, vpp_size {vpp})")
    counts = pipeline_stage_layers(num_layers, pp_size, first=num_layers_in_first_stage,
                                   last=num_layers_in_last_stage, vpp_size=vpp)
    chunk_sizes = [c // vpp for c in counts]
    offset = stage * sum(chunk_sizes) + sum(chunk_sizes[:pp_rank])
    return range(offset, offset + chunk_sizes[pp_rank])


def stage_moe_layers(
    moe_pattern: Sequence[int] | int,
    *,
    pp_size: int,
    pp_rank: int,
    vpp_size: int | None = None,
    vp_stage: int | None = None,
    num_layers_in_first_stage: int | None = None,
    num_layers_in_last_stage: int | None = None,
    num_layers: int | None = None,
) -> list[int]:
    """Global indices of the MoE layers built on this (virtual) pipeline stage, in build order
    (= the creation order of their routers, hence of ``RouterReplay`` instances)."""
    flags = moe_layer_pattern(moe_pattern, num_layers)
    layers = stage_layer_range(
        len(flags),
        pp_size=pp_size,
        pp_rank=pp_rank,
        vpp_size=vpp_size,
        vp_stage=vp_stage,
        num_layers_in_first_stage=num_layers_in_first_stage,
        num_layers_in_last_stage=num_layers_in_last_stage,
    )
    return [i for i in layers if flags[i]]


def moe_slots(moe_pattern: Sequence[int] | int, layers: Sequence[int]) -> list[int]:
    """Positions of global MoE ``layers`` on the compact layer axis (the ``M`` of
    ``routes_SBMK``), which holds MoE layers only, in global order."""
    flags = moe_layer_pattern(moe_pattern)
    slot_of = {}
    for i, v in enumerate(flags):
        if v:
            slot_of[i] = len(slot_of)
    missing = [i for i in layers if i not in slot_of]
    if missing:
        raise ValueError(f"layers {missing} are not MoE layers in pattern {flags}")
    return [slot_of[i] for i in layers]


def layer_targets(routes_SBMK: torch.Tensor, slot: int) -> torch.Tensor:
    """One layer's routes as the router sees them: ``[S * B, K]`` int64, row ``s * B + b``.
    The only place compact storage is widened."""
    seq, batch, _, topk = routes_SBMK.shape
    return routes_SBMK[:, :, slot].reshape(seq * batch, topk).to(torch.int64)
