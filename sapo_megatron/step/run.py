"""The SAPO training step inside Megatron-Core's pipeline schedules.

``make_forward_step`` returns the ``forward_step(data_iterator, model)`` that
``megatron.core.pipeline_parallel.get_forward_backward_func()`` drives; its loss function
runs on the last pipeline stage only and computes vocab-parallel log-probs, then the
configured policy loss.

Normalisation (why a step's gradient does not depend on how it is split). Every reduction is
written as a weighted token sum, ``loss = sum_t w_t * l_t``, whose weights use denominators
that are *global to the optimizer step* (all microbatches, all data-parallel ranks):
:func:`assign_step_weights` counts tokens and sequences locally, all-reduces them over the
data-parallel group and stores the weights in each microbatch. The sum of all microbatches'
weighted sums on all DP ranks is then exactly the loss of the whole step.

Megatron-Core would otherwise rescale that sum: by ``1/num_microbatches`` and by the CP size in
``forward_step_calc_loss``, and by ``1/dp_size`` in the DDP gradient all-reduce. We run with
``calculate_per_token_loss=True`` (set by ``to_transformer_config``), which disables all three
and instead divides the summed gradients by the all-reduced token count that the loss function
returns. So the loss function returns ``(weighted_sum * N_step, n_local)`` with
``sum(n_local) == N_step``: Megatron's division by ``N_step`` cancels the factor exactly.

Devices. Microbatches are built on the host; :func:`prepare_microbatch`, inside the forward
step, moves one to the model's device right before its forward (routes stay compact on the
host: routing replay moves each layer's slice when it sets it as a target). Microbatches hold
no dense attention mask: :func:`model_forward` builds one, on the device, for the microbatch in
flight and only for the local spec (CPU); Transformer Engine gets none. Every reduction goes
through ``sapo_megatron.collectives``, whose tensors live on the group's device.

Context parallelism (CP). Weights are assigned on the full microbatches; the forward step then
keeps this CP rank's share (:func:`sapo_megatron.step.batch.cp_shard`, Megatron's
``get_batch_on_this_cp_rank`` layout). ``n_local`` is the CP shard's token count, so its sum
over the DP x CP group (which ``finalize_model_grads`` all-reduces) is still ``N_step``, and the
metrics are reduced over that group too. A sequence-level ratio (``gspo``, ``sapo_seq``) spans
the CP ranks of its sequence: its per-sequence sums are all-reduced over the CP group.

Usage: see ``sapo_megatron.cli demo`` and ``tests/dist/step_worker.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Iterable

import torch
import torch.distributed as dist

from sapo_megatron.collectives import all_reduce_dict, all_reduce_tensor, all_reduce_values
from sapo_megatron.logprobs import fused_vocab_parallel_log_probs, vocab_parallel_log_probs
from sapo_megatron.losses import (
    POLICY_LOSSES,
    REDUCTIONS,
    PolicyLossConfig,
    compute_policy_loss,
    reduction_weights,
)
from sapo_megatron.losses.policy import sequence_sums_reduced_by
from sapo_megatron.step.batch import (
    Microbatch,
    cp_shard,
    dense_attention_mask,
    per_sample_view,
    target_counts,
    to_device,
)
from sapo_megatron.step.sharding import unwrap


@dataclass
class PolicyLossSpec(PolicyLossConfig):
    """What the loss function computes: the loss's parameters (:class:`PolicyLossConfig`, which
    it is) plus which loss and reduction, and how log-probs are taken. The config's ``loss:``
    section is this class, so it is validated once, here, with ``loss.x`` in its messages."""

    key_prefix: ClassVar[str] = "loss"
    type: str = "sapo"  # a name in sapo_megatron.losses.POLICY_LOSSES
    reduction: str = "seq_mean_token_mean"  # a name in sapo_megatron.losses.REDUCTIONS
    temperature: float = 1.0
    # Tokens (rows) per float32 chunk of the log-softmax (None: the module's ~64 MB default).
    logprob_chunk_size: int | None = None
    # Log-probs straight from the output layer's input and weight, never materialising the
    # logits (sapo_megatron.logprobs.fused); false: the output layer's logits, then
    # vocab_parallel_log_probs. Every pass: old log-probs, reference, update.
    fused_logprobs: bool = True
    # Dr.GRPO's constant for seq_mean_token_sum_norm; None = longest sample of the step.
    norm_length: int | None = None

    def validate(self) -> None:
        super().validate()
        # Registries are read now, so a loss registered by user code before loading is accepted.
        for name, registry in (("type", POLICY_LOSSES), ("reduction", REDUCTIONS)):
            if getattr(self, name) not in registry:
                raise ValueError(f"loss.{name} must be one of {sorted(registry)}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.fused_logprobs, bool):
            raise ValueError(f"loss.fused_logprobs must be true or false, got {self.fused_logprobs!r}")
        for name in ("logprob_chunk_size", "norm_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"loss.{name} must be >= 1 or null, got {value!r}")

    def pass_options(self) -> dict:
        """What a forward-only log-prob pass (old log-probs, reference, live routes, the doctor)
        takes from the loss, so that every pass computes log-probs as the update does."""
        return {"temperature": self.temperature, "fused": self.fused_logprobs, "chunk_size": self.logprob_chunk_size}


def _data_parallel_group(with_context_parallel: bool = False):
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=with_context_parallel)


def context_parallel_rank_size() -> tuple[int, int]:
    """(rank, size) in Megatron's context-parallel group; (0, 1) without model parallelism."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()


def model_device(model) -> torch.device:
    """The device of a model chunk's parameters (CPU for a chunk without any)."""
    inner = unwrap(model)
    for tensor in inner.parameters():
        return tensor.device
    for tensor in inner.buffers():
        return tensor.device
    return torch.device("cpu")


def prepare_microbatch(mb: Microbatch, model) -> Microbatch:
    """``mb`` on ``model``'s device, cut to this context-parallel rank's share."""
    cp_rank, cp_size = context_parallel_rank_size()
    return cp_shard(to_device(mb, model_device(model)), cp_rank, cp_size)


def assign_step_weights(
    microbatches: list[Microbatch], reduction: str, *, norm_length: int | None = None, dp_group=None
) -> list[Microbatch]:
    """Fill ``token_weights`` and ``step_num_tokens`` with step-global denominators.

    Call on the full (not context-parallel-sliced) microbatches of one optimizer step; every
    DP rank calls it with its own share. ``dp_group=None`` uses Megatron's DP x CP group, the
    one ``finalize_model_grads`` divides over: the CP ranks of a DP rank hold the same full
    microbatches, so the sum over it is the DP sum times the CP size, divided out exactly.
    Without torch.distributed the counts are local (a single-process step).
    """
    masks = [per_sample_view(mb.loss_mask, mb.sample_index, fill=False) for mb in microbatches]
    tokens = sum(int(m.sum()) for m in masks)
    sequences = sum(int(m.any(1).sum()) for m in masks)
    longest = max(int((mb.sample_index >= 0).sum(1).max()) for mb in microbatches)
    copies = 1
    group = dp_group
    if dist.is_initialized() and dp_group is None:
        group = _data_parallel_group(with_context_parallel=True)
        copies = context_parallel_rank_size()[1]
    total_tokens, total_sequences = all_reduce_values([tokens, sequences], group=group)
    step_tokens, step_sequences = int(total_tokens) // copies, int(total_sequences) // copies
    peak = all_reduce_values([longest], op="max", group=group)[0]
    length = norm_length if norm_length is not None else int(peak)
    out = []
    for mb, mask in zip(microbatches, masks):
        if step_tokens == 0:
            weights = torch.zeros(mask.shape, dtype=torch.float32)
        else:
            weights = reduction_weights(
                mask,
                reduction,
                num_sequences=step_sequences,
                total_tokens=step_tokens,
                norm_length=length,
            ).to(torch.float32)
        out.append(dataclasses.replace(mb, token_weights=weights, step_num_tokens=step_tokens))
    return out


def token_log_probs(output_tensor, labels, *, output_weight=None, **kwargs):
    """Log-probs (and entropy) of ``labels`` from the model's output: ``[B, S, V/TP]`` logits,
    or ``[B, S, H]`` hidden states when ``output_weight`` (the output layer's shard) is given."""
    if output_weight is not None:
        return fused_vocab_parallel_log_probs(output_tensor, output_weight, labels, tp_group=tp_group_or_none(),
                                              **kwargs)
    return vocab_parallel_log_probs(output_tensor, labels, tp_group=tp_group_or_none(), **kwargs)


def loss_func(mb: Microbatch, spec: PolicyLossSpec, output_tensor: torch.Tensor, *, output_weight=None):
    """Loss on the last pipeline stage; the 3-tuple contract of ``calculate_per_token_loss``.

    ``output_tensor`` is the logits, or the output layer's input when ``output_weight`` is given
    (the fused path, :func:`model_forward`)."""
    if mb.token_weights is None or mb.step_num_tokens is None:
        raise ValueError("microbatch has no step weights: call assign_step_weights first")
    log_probs, entropy = token_log_probs(
        output_tensor,
        mb.labels,
        output_weight=output_weight,
        temperature=spec.temperature,
        with_entropy=True,
        chunk_size=spec.logprob_chunk_size,
    )
    # Losses see one sample per row, whatever the layout (see Microbatch.sample_index).
    view = partial(per_sample_view, sample_index=mb.sample_index)
    fields = {name: view(value) for name, value in mb.fields.items()}
    with _sequence_sums_over_context_parallel():
        loss, metrics = compute_policy_loss(
            spec.type,
            view(log_probs),
            fields["old_log_probs"],
            fields["advantages"],
            view(mb.loss_mask, fill=False),
            config=spec,
            reduction=spec.reduction,
            ref_log_probs=fields.get("ref_log_probs"),
            entropy=view(entropy),
            rollout_log_probs=fields.get("rollout_log_probs"),
            token_weights=mb.token_weights,
        )
    num_tokens = mb.loss_mask.sum().to(torch.int)
    reported = {"loss_sum": loss.detach().clone().to(torch.float64)}
    for key, value in metrics.items():
        if key != "loss":
            reported[key] = value.detach().to(torch.float64)
    cp_size = context_parallel_rank_size()[1]
    if cp_size > 1 and "num_sequences" in reported:
        # A sequence spread over CP ranks would be counted on each: count it once (its mask
        # OR-ed over CP), as a share 1/CP per rank, since the metrics are summed over DP x CP.
        from megatron.core import parallel_state

        has_loss = view(mb.loss_mask, fill=False).any(1).to(torch.float64)
        has_loss = all_reduce_tensor(has_loss, op="max", group=parallel_state.get_context_parallel_group())
        reported["num_sequences"] = has_loss.sum() / cp_size
    return loss * mb.step_num_tokens, num_tokens, reported


def _sequence_sums_over_context_parallel():
    """Under CP, reduce sequence-level sums (GSPO-style ratios) over the CP group."""
    from megatron.core import parallel_state

    if context_parallel_rank_size()[1] == 1:
        return contextlib.nullcontext()
    group = parallel_state.get_context_parallel_group()
    return sequence_sums_reduced_by(lambda sums: all_reduce_tensor(sums, group=group))


def _uses_routing_statistics(config) -> bool:
    return bool(
        getattr(config, "num_moe_experts", None)
        and (
            config.moe_router_load_balancing_type not in ("none", None)
            or getattr(config, "moe_z_loss_coeff", None)
            or getattr(config, "moe_router_enable_expert_bias", False)
        )
    )


def model_forward(model, mb: Microbatch, *, fused: bool = False):
    """The model call shared by the training and the log-prob passes.

    Routes to replay are handed to the routers right here, just before this microbatch's
    forward (several microbatches are in flight under pipeline 1F1B). Padding is excluded
    from MoE load-balancing statistics when those are in use. ``fused``: the stage holding the
    output layer returns that layer's input ``[B, S, H]`` instead of logits
    (:mod:`sapo_megatron.mcore.output_layer`); pair it with :func:`fused_output_weight`.
    """
    from sapo_megatron.routing.replay import routing_replay_of

    replay = routing_replay_of(model)
    if replay is not None:
        replay.on_microbatch(mb.routes, device=mb.tokens.device)
    kwargs = {"packed_seq_params": mb.packed_seq_params}
    if mb.padding_mask is not None and _uses_routing_statistics(unwrap(model).config):
        kwargs["padding_mask"] = mb.padding_mask
    if fused:
        from sapo_megatron.mcore.output_layer import forward_hidden

        return forward_hidden(model, mb.tokens, mb.position_ids, _attention_mask(model, mb), **kwargs)
    return model(mb.tokens, mb.position_ids, _attention_mask(model, mb), **kwargs)


def fused_output_weight(model, fused: bool):
    """The output weight shard the fused log-probs multiply, on the stage holding the output
    layer; None elsewhere or unfused (the loss then reads logits)."""
    if not fused or not getattr(unwrap(model), "post_process", False):
        return None
    from sapo_megatron.mcore.output_layer import output_weight

    return output_weight(model)


_ATTENTION_KIND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attention_kind(model) -> str | None:
    """``"local"`` when ``model`` attends through Megatron's local ``DotProductAttention`` (the
    CPU spec), which needs an explicit mask; ``"te"`` for any other attention (Transformer
    Engine's causal and THD kernels need none); None for a chunk without attention."""
    inner = unwrap(model)
    if inner not in _ATTENTION_KIND:
        from megatron.core.transformer.attention import Attention
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        modules = list(inner.modules())
        kind = None
        if any(isinstance(m, DotProductAttention) for m in modules):
            kind = "local"
        elif any(isinstance(m, Attention) for m in modules):
            kind = "te"
        _ATTENTION_KIND[inner] = kind
    return _ATTENTION_KIND[inner]


def _attention_mask(model, mb: Microbatch):
    """The mask the model's attention needs for ``mb``: built here, for this microbatch only,
    on the local spec; None on Transformer Engine (causal kernels, THD bounds for packing)."""
    if mb.attention_mask is not None:
        return mb.attention_mask
    kind = attention_kind(model)
    if kind == "local":
        return dense_attention_mask(mb)
    if kind == "te" and mb.layout == "packed" and mb.packed_seq_params is None:
        raise ValueError(
            "a packed microbatch needs PackedSeqParams on Transformer Engine, or its samples "
            "would attend to each other: collate it with collate_packed(..., use_thd=True)")
    return None


def forward_step(spec: PolicyLossSpec, data_iterator, model):
    """One microbatch forward; returns the output and the loss closure (Megatron's contract)."""
    mb = prepare_microbatch(next(data_iterator), model)
    fused = spec.fused_logprobs
    output = model_forward(model, mb, fused=fused)
    return output, partial(loss_func, mb, spec, output_weight=fused_output_weight(model, fused))


def make_forward_step(spec: PolicyLossSpec):
    return partial(forward_step, spec)


_SUMMED = ("loss_sum", "num_tokens", "num_sequences")


def tp_group_or_none():
    """The tensor-parallel group, or None without tensor parallelism (a local computation)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def run_schedule(model_chunks: list, microbatches: list, forward_step_func, *, forward_only: bool) -> list:
    """Drive Megatron's pipeline schedule over ``microbatches`` (one shape per call under PP)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batch_size, seq_length = microbatches[0].tokens.shape
    num_chunks = len(model_chunks)
    iterators = [iter(microbatches) for _ in range(num_chunks)]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if num_chunks > 1 else iterators[0],
        model=model_chunks if num_chunks > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(obj):
    """``obj`` as held by the last pipeline stage, on every stage (an object broadcast)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return box[0]


def _merge_metrics(per_microbatch: Iterable[dict]) -> dict[str, float]:
    """Combine microbatch metrics: exact loss sum, min/max, token-weighted means; DP-reduced."""
    from megatron.core import parallel_state

    per_microbatch = list(per_microbatch)
    nonempty = [d for d in per_microbatch if float(d["num_tokens"]) > 0]
    keys = sorted({k for d in per_microbatch for k in d})
    sums, mins, maxs = {}, {}, {}
    for key in keys:
        if key.endswith("_min"):
            # An empty microbatch reports 0 for its extremes; it must not win.
            mins[key] = min((float(d[key]) for d in nonempty if key in d), default=float("inf"))
        elif key.endswith("_max"):
            maxs[key] = max((float(d[key]) for d in nonempty if key in d), default=float("-inf"))
        elif key in _SUMMED:
            sums[key] = sum(float(d[key]) for d in per_microbatch if key in d)
        else:
            sums[key] = sum(float(d[key]) * float(d["num_tokens"]) for d in nonempty if key in d)
    # CP ranks hold different tokens of the same samples: reduce over DP x CP.
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    out = {}
    for table, op in ((sums, "sum"), (mins, "min"), (maxs, "max")):
        out.update(all_reduce_dict(table, op=op, group=group))
    tokens = max(out.get("num_tokens", 0.0), 1.0)
    for key in sums:
        if key not in _SUMMED:
            out[key] /= tokens
    out["loss"] = out.pop("loss_sum", 0.0)
    return out


def run_step(
    model_chunks: list,
    microbatches: list[Microbatch],
    spec: PolicyLossSpec,
    *,
    optimizer=None,
    forward_only: bool = False,
) -> dict[str, float]:
    """Forward/backward over ``microbatches`` (already weighted) and an optional optimizer step.

    Returns the step's metrics on every rank: ``loss`` is the exact step loss, the rest are
    token-weighted means (``*_min`` / ``*_max`` are extremes), plus ``grad_norm`` after an
    update.
    """
    from megatron.core import parallel_state

    if not microbatches:
        raise ValueError("run_step needs at least one microbatch")
    shapes = {tuple(mb.tokens.shape) for mb in microbatches}
    # Token-budget microbatches differ in shape; Megatron's p2p then exchanges shapes first.
    variable = getattr(unwrap(model_chunks[0]).config, "variable_seq_lengths", False)
    if len(shapes) != 1 and parallel_state.get_pipeline_model_parallel_world_size() > 1 and not variable:
        raise ValueError(
            f"pipeline parallelism needs equally shaped microbatches, got shapes {sorted(shapes)}"
        )
    if not forward_only:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
    outputs = run_schedule(model_chunks, microbatches, make_forward_step(spec), forward_only=forward_only)
    metrics = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        metrics = _merge_metrics(outputs)
    metrics = broadcast_from_last_stage(metrics)
    if optimizer is not None and not forward_only:
        success, grad_norm, _ = optimizer.step()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_successful"] = float(bool(success))
    return metrics


def _log_prob_loss_func(mb: Microbatch, temperature: float, chunk_size, output_tensor, *, output_weight=None):
    log_probs = token_log_probs(
        output_tensor, mb.labels, output_weight=output_weight, temperature=temperature, chunk_size=chunk_size
    )
    per_sample = per_sample_view(log_probs.detach(), mb.sample_index)
    if context_parallel_rank_size()[1] > 1:
        # Each target lives on exactly one CP rank (0 elsewhere in the view): the sum is exact.
        from megatron.core import parallel_state

        per_sample = all_reduce_tensor(per_sample, group=parallel_state.get_context_parallel_group())
    lengths = target_counts(mb.sample_index).tolist()
    rows = [per_sample[i, :n].cpu() for i, n in enumerate(lengths)]
    return torch.zeros((), device=output_tensor.device), torch.zeros((), dtype=torch.int), {"log_probs": rows}


def _log_prob_forward_step(temperature, chunk_size, fused, data_iterator, model):
    mb = prepare_microbatch(next(data_iterator), model)
    output = model_forward(model, mb, fused=fused)
    return output, partial(_log_prob_loss_func, mb, temperature, chunk_size,
                           output_weight=fused_output_weight(model, fused))


@torch.no_grad()
def collect_log_probs(
    model_chunks: list,
    microbatches: list[Microbatch],
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    fused: bool = True,
) -> list[torch.Tensor]:
    """Per-sample target log-probs (``[L-1]`` each, in microbatch order) on every PP rank.

    This is the old-policy (or reference) pass of an RL step: a forward-only schedule whose
    loss function returns log-probs instead of a loss. ``fused`` (the default, as
    ``loss.fused_logprobs``): from the output layer's input, never materialising the logits.
    """
    from megatron.core import parallel_state

    outputs = run_schedule(
        model_chunks, microbatches, partial(_log_prob_forward_step, temperature, chunk_size, fused), forward_only=True
    )
    rows = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        rows = [row for out in outputs for row in out["log_probs"]]
    return broadcast_from_last_stage(rows)
