"""RL samples and their collation into Megatron-Core microbatches (padded or packed).

Alignment convention (the one Megatron uses for ``labels``): for a sample of tokens
``x_0 .. x_{L-1}``, every per-token field has length ``L - 1`` and entry ``t`` belongs to the
prediction of ``x_{t+1}`` from ``x_0 .. x_t``. ``loss_mask`` is true on response targets.

Two layouts:
- **padded** (``[B, S]``): samples right-padded to a common length, causal attention;
- **packed** (``[1, T]``, THD): samples concatenated, positions restarting per sample. The row
  holds the sum of its samples' lengths, rounded up only as far as the parallel layout needs
  (:func:`packed_row_length`); the few padding tokens extend the last sample's padded segment
  (``cu_seqlens_padded``), they are not a segment of their own. With Transformer Engine the
  model receives ``PackedSeqParams``: the kernel attends within each sample's true bounds
  (``cu_seqlens``) and skips the padding altogether.

No microbatch carries a dense ``[S, S]`` mask. Transformer Engine's causal kernels ignore the
mask (and THD needs none); the local spec (CPU) needs one, so :func:`dense_attention_mask`
builds it in the forward step for the microbatch in flight only (``step.run.model_forward``):
causal for the padded layout, block-diagonal causal for the packed one, where a padding token
attends only to itself and no real token attends to padding. Mathematically the same as THD,
and tested against the padded layout.

Lengths are rounded up to a multiple of what tensor/sequence and context parallelism need
(:func:`sequence_multiples`, upstream's rule). Padding never carries loss, is marked in
``padding_mask`` (MoE load-balancing statistics skip it) and is never replayed by routing replay.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

# Per-token float fields a sample may carry (all length L-1, aligned to targets).
TOKEN_FIELDS = ("old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs")


@dataclass
class Sample:
    """One rollout: prompt + response tokens and the per-target fields the loss needs."""

    tokens: torch.Tensor  # [L] long
    loss_mask: torch.Tensor  # [L-1] bool, True on response targets
    old_log_probs: torch.Tensor  # [L-1]
    advantages: torch.Tensor  # [L-1] (the sequence advantage broadcast over its tokens)
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    # MoE routes [L-1, num_moe_layers, topk] (compact int), row t = token t. The last token has
    # none (a rollout engine never feeds it); it routes live, which cannot change any log-prob:
    # its output predicts nothing inside the sample.
    routes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        length = self.tokens.numel()
        if self.tokens.dim() != 1 or length < 2:
            raise ValueError(
                f"Sample.tokens must be a 1-D tensor of at least 2 tokens, got shape "
                f"{tuple(self.tokens.shape)}"
            )
        for name in ("loss_mask", *TOKEN_FIELDS):
            value = getattr(self, name)
            if value is not None and value.shape != (length - 1,):
                raise ValueError(
                    f"Sample.{name} has shape {tuple(value.shape)}, expected ({length - 1},) "
                    f"(one entry per target: {length} tokens - 1)"
                )
        if self.routes is not None and (self.routes.dim() != 3 or self.routes.shape[0] != length - 1):
            raise ValueError(
                f"Sample.routes has shape {tuple(self.routes.shape)}, expected "
                f"({length - 1}, num_moe_layers, topk): one row per token but the last of {length}"
            )


@dataclass
class Microbatch:
    """Tensors for one forward/backward of the training step (see module docstring)."""

    tokens: torch.Tensor  # [B, S]
    layout: str  # "padded" or "packed"
    labels: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    # [B|1, 1, S, S] bool, True = masked out. None from collation: the forward step builds it
    # for the local spec only (dense_attention_mask), for the microbatch in flight.
    attention_mask: torch.Tensor | None
    loss_mask: torch.Tensor  # [B, S] bool
    # [N, L] flat positions (into the [B*S] layout) of each sample's targets, -1 past its end.
    # Losses see samples as rows of this view, whether the layout is padded or packed, so
    # sequence-level quantities (GSPO ratios, per-sequence means) never mix packed samples.
    sample_index: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # TOKEN_FIELDS present, [B, S]
    packed_seq_params: object | None = None
    # True at padding positions, for MoE routing statistics (Megatron's padding_mask).
    padding_mask: torch.Tensor | None = None
    # Routes to replay (sapo_megatron.routing.attach_routes); None when routing is live.
    routes: object | None = None
    # Filled by sapo_megatron.step.run.assign_step_weights:
    token_weights: torch.Tensor | None = None  # [N, L], in sample_index's view
    step_num_tokens: int | None = None
    # Packed layout: each sample starts a segment rounded up to this many tokens (2 x CP for
    # THD context parallelism, whose slicing cuts every segment into 2 x CP chunks).
    sample_multiple: int = 1
    # Packed layout: [N + 1] int32 bounds of the samples' padded segments (the last one ends at
    # the row's end); what the local spec's block-diagonal mask is built from.
    cu_seqlens_padded: torch.Tensor | None = None


# Entries of ``Microbatch.sample_index`` that point nowhere in the local layout: past the end of
# the sample (-1), or a target held by another context-parallel rank (-2, see ``cp_shard``).
PAST_END = -1
ON_OTHER_CP_RANK = -2


def target_counts(sample_index: torch.Tensor) -> torch.Tensor:
    """Targets per sample (``[N]``), including those another CP rank holds."""
    return (sample_index != PAST_END).sum(1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_multiples(*, tp_size: int = 1, sequence_parallel: bool = False, cp_size: int = 1) -> tuple[int, int]:
    """``(row_multiple, sample_multiple)``: what a microbatch's sequence length, and each packed
    sample's segment, must be a multiple of.

    Upstream's rule (``megatron.core.models.multimodal.context_parallel.get_padding``): sequence
    parallelism scatters the sequence over TP ranks (a multiple of TP); context parallelism cuts
    every sequence into 2 x CP chunks (Transformer Engine's THD partitioning cuts every packed
    segment so: ``thd_get_partitioned_indices``), and with both, a multiple of 2 x CP x TP.
    """
    sp = tp_size if sequence_parallel and tp_size > 1 else 1
    cp = 2 * cp_size if cp_size > 1 else 1
    return sp * cp, cp


def packed_row_length(lengths, multiple: int = 1, *, sample_multiple: int = 1) -> int:
    """Tokens of a packed row holding samples of these ``lengths``: each sample rounded up to
    ``sample_multiple``, the sum rounded up to ``multiple`` (see :func:`sequence_multiples`).

    The one rule for the packed layout's size: ``collate_packed`` builds rows of this length,
    the token budget (``step.budget``) and the memory planner count them so.
    """
    if multiple < 1 or sample_multiple < 1:
        raise ValueError(f"multiples must be >= 1, got multiple={multiple} sample_multiple={sample_multiple}")
    # The row's tail joins the last sample's segment, which must stay a multiple of
    # sample_multiple (sequence_multiples' row multiple always is one; lcm covers other callers).
    return round_up(sum(round_up(int(n), sample_multiple) for n in lengths), math.lcm(multiple, sample_multiple))


def _sample_index(starts: list[int], num_targets: list[int]) -> torch.Tensor:
    width = max(num_targets)
    index = torch.full((len(starts), width), -1, dtype=torch.long)
    for i, (start, n) in enumerate(zip(starts, num_targets)):
        index[i, :n] = torch.arange(start, start + n)
    return index


def per_sample_view(values: torch.Tensor, sample_index: torch.Tensor, fill=0) -> torch.Tensor:
    """``values`` ([B, S] layout) gathered into the ``[N, L]`` per-sample view (differentiable)."""
    flat = values.reshape(-1)
    gathered = flat[sample_index.clamp_min(0)]
    return torch.where(sample_index >= 0, gathered, torch.full_like(gathered, fill))


def _present_fields(samples: list[Sample]) -> list[str]:
    names = []
    for name in TOKEN_FIELDS:
        have = [getattr(s, name) is not None for s in samples]
        if any(have) and not all(have):
            missing = [i for i, h in enumerate(have) if not h]
            raise ValueError(f"samples {missing} lack {name!r}, which other samples carry")
        if all(have):
            names.append(name)
    return names


def collate_padded(
    samples: list[Sample], *, pad_multiple: int = 1, pad_id: int = 0, min_length: int = 0
) -> Microbatch:
    """Right-pad ``samples`` into a ``[B, S]`` microbatch (causal attention, no mask built).

    ``min_length`` pads further, e.g. to give every microbatch of a pipeline-parallel step
    the same shape.
    """
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    names = _present_fields(samples)
    seq = round_up(max(min_length, *(s.tokens.numel() for s in samples)), pad_multiple)
    batch = len(samples)
    tokens = torch.full((batch, seq), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool)
    starts = []
    fields = {n: torch.zeros(batch, seq, dtype=torch.float32) for n in names}
    for b, s in enumerate(samples):
        n = s.tokens.numel()
        tokens[b, :n] = s.tokens
        labels[b, : n - 1] = s.tokens[1:]
        loss_mask[b, : n - 1] = s.loss_mask
        starts.append(b * seq)
        for name in names:
            fields[name][b, : n - 1] = getattr(s, name)
    lengths = torch.tensor([s.tokens.numel() for s in samples])
    return Microbatch(
        tokens=tokens,
        layout="padded",
        labels=labels,
        position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        attention_mask=None,
        loss_mask=loss_mask,
        sample_index=_sample_index(starts, [s.tokens.numel() - 1 for s in samples]),
        fields=fields,
        padding_mask=torch.arange(seq)[None, :] >= lengths[:, None],
    )


def collate_packed(
    samples: list[Sample],
    *,
    pad_multiple: int = 1,
    pad_id: int = 0,
    min_length: int = 0,
    use_thd: bool = False,
    sample_multiple: int = 1,
) -> Microbatch:
    """Concatenate ``samples`` into one ``[1, T]`` row (THD packing).

    ``T = packed_row_length(lengths, pad_multiple, sample_multiple=sample_multiple)``, the
    samples' lengths, not a multiple of the longest (or ``min_length`` rounded up likewise). ``min_length``
    is for equal shapes (pipeline stages without variable sequence lengths, the allgather
    dispatcher). ``sample_multiple`` pads each sample's segment to a multiple of it (context
    parallelism needs ``2 * cp``). Padding carries no loss and belongs to the padded segment of
    the sample before it: ``use_thd=True`` attaches ``PackedSeqParams`` with the true
    (``cu_seqlens_q``) and, where they differ, the padded (``cu_seqlens_q_padded``) bounds, as
    Megatron's ``get_thd_batch_on_this_cp_rank`` builds them, so Transformer Engine never
    attends to padding. Without it the forward step builds the local spec's mask
    (:func:`dense_attention_mask`).
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    if sample_multiple < 1:
        raise ValueError(f"sample_multiple must be >= 1, got {sample_multiple}")
    names = _present_fields(samples)
    lengths = [s.tokens.numel() for s in samples]
    spans = [round_up(n, sample_multiple) for n in lengths]
    # packed_row_length(lengths, pad_multiple, sample_multiple=...) unless min_length is longer.
    total = round_up(max(min_length, sum(spans)), math.lcm(pad_multiple, sample_multiple))
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    labels = torch.full((1, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros(1, total, dtype=torch.long)
    loss_mask = torch.zeros(1, total, dtype=torch.bool)
    fields = {n: torch.zeros(1, total, dtype=torch.float32) for n in names}
    padding = torch.ones(total, dtype=torch.bool)
    starts = torch.tensor([0, *spans], dtype=torch.int64).cumsum(0)[:-1].tolist()
    # The row's tail (what rounding the row up adds) extends the last sample's padded segment.
    spans[-1] += total - sum(spans)
    for s, start, span, n in zip(samples, starts, spans, lengths):
        tokens[0, start : start + n] = s.tokens
        labels[0, start : start + n - 1] = s.tokens[1:]
        position_ids[0, start : start + span] = torch.arange(span)
        loss_mask[0, start : start + n - 1] = s.loss_mask
        padding[start : start + n] = False
        for name in names:
            fields[name][0, start : start + n - 1] = getattr(s, name)
    padded_bounds = torch.tensor([0, *spans], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mb = Microbatch(
        tokens=tokens,
        layout="packed",
        labels=labels,
        position_ids=position_ids,
        attention_mask=None,
        loss_mask=loss_mask,
        sample_index=_sample_index(starts, [n - 1 for n in lengths]),
        fields=fields,
        padding_mask=padding[None, :],
        sample_multiple=sample_multiple,
        cu_seqlens_padded=padded_bounds,
    )
    if use_thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        # Transformer Engine's convention: cu_seqlens count true tokens only (cumulative
        # lengths), cu_seqlens_padded give where each sequence sits in the row.
        true_bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        # Transformer Engine sizes its work by the longest padded segment.
        max_len = max(spans)
        padded = {}
        # Context parallelism slices by the padded bounds (cp_positions), so they go with it.
        if sample_multiple > 1 or not torch.equal(true_bounds, padded_bounds):
            padded = dict(cu_seqlens_q_padded=padded_bounds, cu_seqlens_kv_padded=padded_bounds)
        mb.packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=true_bounds,
            cu_seqlens_kv=true_bounds,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
            **padded,
        )
    return mb


def dense_attention_mask(mb: Microbatch, device=None) -> torch.Tensor:
    """The ``[1, 1, S, S]`` bool mask (True = masked out) the local spec needs for ``mb``.

    Built per microbatch in the forward step, never stored with the step's microbatches.
    Padded layout: causal (a real token never reaches the right padding after it). Packed
    layout: causal within each sample's padded segment, padding keys masked for every query
    but themselves, so padding neither is attended to nor attends to a real token, exactly
    what THD attention with ``cu_seqlens_padded`` computes for the real tokens.
    """
    device = mb.tokens.device if device is None else device
    seq = mb.tokens.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if mb.layout == "padded":
        return ~causal[None, None]
    bounds = mb.cu_seqlens_padded
    if bounds is None or int(bounds[-1]) != seq:
        raise ValueError(
            f"a packed microbatch of {seq} tokens needs cu_seqlens_padded ending at {seq} to build "
            f"its attention mask (got {None if bounds is None else bounds.tolist()}); the local "
            f"spec cannot take a context-parallel shard"
        )
    spans = (bounds[1:] - bounds[:-1]).to(device=device, dtype=torch.long)
    segment = torch.repeat_interleave(torch.arange(spans.numel(), device=device), spans)
    real = ~mb.padding_mask[0].to(device)
    allowed = (segment[:, None] == segment[None, :]) & causal & real[None, :] & real[:, None]
    allowed |= torch.eye(seq, dtype=torch.bool, device=device)
    return ~allowed[None, None]


def _moved(value, device):
    """``value`` on ``device``: tensors, and the tensor fields of a dataclass such as
    ``PackedSeqParams`` (its cu_seqlens feed the attention kernel)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: getattr(value, f.name).to(device)
            for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), torch.Tensor)
        }
        return dataclasses.replace(value, **changes) if changes else value
    return value


def to_device(mb: Microbatch, device) -> Microbatch:
    """``mb`` with every tensor on ``device`` (the model's), called inside the forward step.

    Routes are left alone: they stay compact on the host, and routing replay moves each
    layer's slice when it hands it to the router as a target.
    """
    moved = {
        f.name: _moved(getattr(mb, f.name), device)
        for f in dataclasses.fields(mb)
        if f.name not in ("fields", "routes")
    }
    moved["fields"] = {k: v.to(device) for k, v in mb.fields.items()}
    return dataclasses.replace(mb, **moved)


def cp_positions(mb: Microbatch, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Sequence positions (of ``mb.tokens.shape[1]``) that context-parallel rank ``cp_rank`` keeps.

    Padded layout: Megatron's ``get_batch_on_this_cp_rank`` (``2 * cp`` chunks, rank ``r``
    keeps chunks ``r`` and ``2 cp - 1 - r``). Packed THD layout: the same per padded segment
    (Transformer Engine's ``thd_get_partitioned_indices``), from ``cu_seqlens_q_padded``.
    """
    from sapo_megatron.routing.align import cp_slice, thd_cp_indices

    seq = mb.tokens.shape[1]
    if mb.layout == "padded":
        return cp_slice(torch.arange(seq), cp_rank, cp_size)
    params = mb.packed_seq_params
    bounds = getattr(params, "cu_seqlens_q_padded", None) if params is not None else None
    if bounds is None:
        raise ValueError(
            "a packed microbatch needs THD PackedSeqParams with cu_seqlens_q_padded for context "
            "parallelism: collate it with collate_packed(..., use_thd=True, sample_multiple=2 * cp)"
        )
    return thd_cp_indices(bounds.cpu(), cp_rank, cp_size)


def cp_shard(mb: Microbatch, cp_rank: int, cp_size: int) -> Microbatch:
    """This context-parallel rank's share of a full microbatch (identity at ``cp_size == 1``).

    Every per-token tensor keeps the positions :func:`cp_positions` names, along the sequence
    dimension (dim 1; dim 2 of the attention mask, as Megatron slices it). ``sample_index`` is
    re-pointed into the local layout, with ``ON_OTHER_CP_RANK`` where a target lives on another
    CP rank (``per_sample_view`` fills it like padding; ``target_counts`` still counts it), so
    the per-sample ``[N, L]`` view, and the step weights in it, keep their shape on every rank.
    Routes (still compact, on the host) get the same slice through ``routing.align``.
    """
    if cp_size == 1:
        return mb
    from sapo_megatron.routing.align import cp_slice, cp_slice_thd

    keep = cp_positions(mb, cp_rank, cp_size).to(mb.tokens.device)
    batch, seq = mb.tokens.shape
    local = keep.numel()

    def cut(x, dim=1):
        return None if x is None else x.index_select(dim, keep.to(x.device))

    # Flat position b * seq + s of the full layout -> b * local + j of the local one, or -1.
    inverse = torch.full((batch * seq,), -1, dtype=torch.long, device=mb.sample_index.device)
    rows = torch.arange(batch, device=inverse.device)[:, None]
    inverse[(rows * seq + keep.to(inverse.device)[None, :]).reshape(-1)] = torch.arange(
        batch * local, device=inverse.device
    )
    index = mb.sample_index
    moved = inverse[index.clamp_min(0)]
    sample_index = torch.where(
        index < 0, index, torch.where(moved >= 0, moved, moved.new_full((), ON_OTHER_CP_RANK))
    )
    routes = mb.routes
    if routes is not None:
        if tuple(routes.sp_shard) != (0, 1):
            raise ValueError(
                f"microbatch routes were aligned for sequence-parallel shard {routes.sp_shard}; under "
                f"context parallelism attach them for the whole sequence (tp_size=1): the CP slice "
                f"comes first and routing replay takes the SP shard of what is left"
            )
        if mb.layout == "padded":
            slice_ = lambda t: cp_slice(t, cp_rank, cp_size, seq_dim=0)  # noqa: E731
        else:
            bounds = mb.packed_seq_params.cu_seqlens_q_padded.cpu()
            slice_ = lambda t: cp_slice_thd(t, bounds, cp_rank, cp_size, seq_dim=0)  # noqa: E731
        routes = dataclasses.replace(
            routes,
            routes_SBMK=slice_(routes.routes_SBMK),
            replay_mask_SB=slice_(routes.replay_mask_SB),
            pad_mask_SB=slice_(routes.pad_mask_SB),
        )
    return dataclasses.replace(
        mb,
        tokens=cut(mb.tokens),
        labels=cut(mb.labels),
        position_ids=cut(mb.position_ids),
        attention_mask=cut(mb.attention_mask, dim=2),
        loss_mask=cut(mb.loss_mask),
        padding_mask=cut(mb.padding_mask),
        fields={k: cut(v) for k, v in mb.fields.items()},
        sample_index=sample_index,
        routes=routes,
    )


def split_step_samples(
    samples: list[Sample], *, dp_rank: int, dp_size: int, num_microbatches: int
) -> list[list[Sample]]:
    """This DP rank's contiguous share of a step's samples, cut into ``num_microbatches``."""
    per_rank, rem = divmod(len(samples), dp_size)
    if rem or per_rank % num_microbatches or per_rank == 0:
        raise ValueError(
            f"{len(samples)} samples cannot be split evenly over {dp_size} data-parallel ranks "
            f"x {num_microbatches} microbatches"
        )
    mine = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    size = per_rank // num_microbatches
    return [mine[i * size : (i + 1) * size] for i in range(num_microbatches)]
