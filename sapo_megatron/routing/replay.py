"""Force Megatron-Core's MoE routers to use given routes (replay), or record theirs (R2).

Injection, no fork: :mod:`sapo_megatron.mcore.router_replay` puts a hook on every MoE router
that asks one :class:`LayerReplay` of ours for the top-k (and says why it does not join
Megatron's process-global ``RouterReplay`` list). Everything else is ours and lives here: all
bookkeeping is per model chunk, in a :class:`RoutingReplay` controller.

Why not Megatron's own actions: its REPLAY_FORWARD replays every token of a microbatch, and
the caller must flip the action between forward and recompute. We need (a) a per-token
fallback to live routing (SGLang never routes the last generated token), (b) live scores
while replaying, to measure routing agreement, and (c) correctness with several microbatches
in flight under PP 1F1B and with activation recomputation. So:

- the forward step pushes each microbatch's routes right before its forward
  (:meth:`RoutingReplay.on_microbatch`); each layer pops them FIFO on its forward call;
- a call made while autograd is executing a backward (``torch._C._current_graph_task_id()``
  is set) is a recomputation: it pops a second FIFO filled by the forward calls, so the
  backward replays exactly the routes its forward used, in schedule order;
- :meth:`RoutingReplay.finish` asserts that every pushed route was consumed exactly once by a
  forward (and once by a recompute where the router sits inside an activation checkpoint: seen
  at run time, since full/block/selective recompute each recompute different routers);
- nothing in the hooks makes the host wait for the GPU (upstream's replay has no counts to
  keep, ours must not pay for them): routes cross to the device in non-blocking copies, once
  per microbatch; agreement counts are summed on the device and read once per step
  (:func:`replay_metrics`); recorded routes stay on the device, compact, until the pass ends
  (``tests/test_replay_syncs.py`` counts the syncs).

Actions: ``None`` (live routing, untouched), ``"record"`` (R2's old-log-prob pass: route live
and keep the indices), ``"replay"`` (use pushed routes where the replay mask is set, live
routing elsewhere), ``"compare"`` (route live but measure agreement with pushed routes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sapo_megatron.collectives import all_reduce_tensor
from sapo_megatron.mcore.router_replay import install_router_hook, moe_routers
from sapo_megatron.routing.align import sp_slice
from sapo_megatron.routing.compact import storage_dtype
from sapo_megatron.step.sharding import unwrap

ACTIONS = (None, "record", "replay", "compare")
_ATTR = "_sapo_routing_replay"


@dataclass
class MicrobatchRoutes:
    """Routes of one microbatch in Megatron's router order, full sequence, all MoE layers."""

    routes_SBMK: torch.Tensor  # compact integer dtype, [S, B, num_moe_layers, topk]
    replay_mask_SB: torch.Tensor  # bool: replay this token (False: live fallback)
    pad_mask_SB: torch.Tensor  # bool: padding (never counted)
    # (tp_rank, tp_size) of the sequence-parallel shard S already is; (0, 1) = whole sequence.
    sp_shard: tuple[int, int] = (0, 1)


@dataclass
class _Target:
    idx_TK: torch.Tensor  # compact dtype, on the device; widened to int64 when used
    replay_T: torch.Tensor
    valid_T: torch.Tensor


COUNTS = ("tokens", "replayed", "agree", "fallback")  # the columns of LayerReplay.counts_C


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def same_topk_set(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Per token: do two top-k index rows name the same set of experts (order ignored)?"""
    return (a_TK.sort(dim=1).values == b_TK.sort(dim=1).values).all(dim=1)


class LayerReplay:
    """What one local MoE layer's router uses for its top-k, given its live choice."""

    def __init__(self, controller: "RoutingReplay", moe_index: int):
        self.controller = controller
        self.moe_index = moe_index
        self.forward_queue: list[_Target] = []
        self.recompute_queue: list[_Target] = []
        self.recorded: list[torch.Tensor] = []  # per microbatch, compact dtype, on the device
        # Token counts (COUNTS) summed on the device: read once per step by replay_metrics.
        self.counts_C: torch.Tensor | None = None

    def select(self, scores, live_values, live_idx):
        """``(probs, indices)`` for the router: live, recorded, replayed or compared, per action."""
        action = self.controller.action
        if action is None:
            return live_values, live_idx
        recompute = _in_backward()
        if action == "record":
            if not recompute:
                self.recorded.append(live_idx.detach().to(self.controller.route_dtype))
            return live_values, live_idx
        target = self._next_target(recompute)
        if target.idx_TK.shape != live_idx.shape:
            raise RuntimeError(
                f"routing replay: MoE layer {self.moe_index} got routes for "
                f"{tuple(target.idx_TK.shape)} (tokens, topk) but the router sees "
                f"{tuple(live_idx.shape)}; the routes were aligned to another layout"
            )
        replayed_idx = torch.where(target.replay_T[:, None], target.idx_TK.long(), live_idx)
        idx = live_idx if action == "compare" else replayed_idx
        if not recompute:
            self._count(live_idx, replayed_idx, target)
            if self.controller.keep_used:
                self.recorded.append(idx.detach().to(self.controller.route_dtype))
        if action == "compare":
            return live_values, live_idx
        return scores.gather(1, idx), idx

    def _next_target(self, recompute: bool) -> _Target:
        queue = self.recompute_queue if recompute else self.forward_queue
        if not queue:
            kind = "recompute" if recompute else "forward"
            raise RuntimeError(
                f"routing replay: MoE layer {self.moe_index} ran a {kind} pass with no routes "
                f"pushed for it (was the microbatch built without routes?)"
            )
        target = queue.pop(0)
        if not recompute and self.controller.with_backward and not torch.is_grad_enabled():
            # A training forward without autograd is the first pass of an activation checkpoint
            # (Megatron's and TE's checkpoints are reentrant: they run the forward under no_grad
            # and again in backward). Only such a router runs twice, whatever the recompute
            # settings (full or block, selective "moe"; not "core_attn" or "moe_act").
            self.recompute_queue.append(target)
        return target

    def _count(self, live_idx, used_idx, target: _Target) -> None:
        """Add this microbatch's counts on the device: reading them here (``int(t.sum())``)
        would stall the host behind the GPU four times per layer per microbatch."""
        with torch.no_grad():
            valid = target.valid_T
            replayed = target.replay_T & valid
            agree = same_topk_set(live_idx, used_idx) & replayed
            counts_C = torch.stack([valid, replayed, agree, valid & ~target.replay_T]).sum(1)
            self.counts_C = counts_C if self.counts_C is None else self.counts_C + counts_C


@dataclass
class RoutingReplay:
    """Per-model-chunk controller: which routers exist here, what they replay, what they saw."""

    layers: list[LayerReplay] = field(default_factory=list)
    moe_columns: list[int] = field(default_factory=list)  # column in the MoE-only route axis
    num_moe_layers: int = 0
    sequence_parallel: bool = False
    action: str | None = None
    pushed: int = 0
    # Keep the indices each router actually used (for checks and R2-style export).
    keep_used: bool = False
    # Whether the current pass runs a backward (and so, with recomputation, a second forward).
    with_backward: bool = False
    # Recorded routes are kept in the rollout batch's compact dtype (compact.storage_dtype).
    route_dtype: torch.dtype = torch.int64
    topk: int | None = None

    def on_microbatch(self, routes: MicrobatchRoutes | None, *, device=None) -> None:
        """Called by the forward step right before a microbatch's forward.

        Routes arrive compact on the host. This chunk's MoE layers cross to ``device`` (the
        model's) in one non-blocking copy, the two masks in another, whatever the layer count:
        a blocking copy per layer would make the host wait for the GPU each time. Each layer's
        slice stays compact until its router widens it to int64.
        """
        if self.action not in ("replay", "compare"):
            return
        if routes is None:
            raise ValueError(
                "routing replay is on but the microbatch carries no routes; attach them with "
                "sapo_megatron.routing.attach_routes (or set routing mode 'none')"
            )
        routes_SBMK, replay_SB, pad_SB = routes.routes_SBMK, routes.replay_mask_SB, routes.pad_mask_SB
        if routes_SBMK.shape[2] != self.num_moe_layers:
            raise ValueError(
                f"microbatch routes cover {routes_SBMK.shape[2]} MoE layers, the model has "
                f"{self.num_moe_layers}"
            )
        if self.sequence_parallel:
            from megatron.core import parallel_state

            rank = parallel_state.get_tensor_model_parallel_rank()
            size = parallel_state.get_tensor_model_parallel_world_size()
            if routes.sp_shard == (0, 1):
                routes_SBMK, replay_SB, pad_SB = (sp_slice(t, rank, size) for t in (routes_SBMK, replay_SB, pad_SB))
            elif routes.sp_shard != (rank, size):
                raise ValueError(
                    f"microbatch routes were aligned for sequence-parallel shard {routes.sp_shard}, "
                    f"this rank is ({rank}, {size})"
                )
        if not self.layers:  # a pipeline stage without MoE layers
            self.pushed += 1
            return
        columns = self.moe_columns
        lo = columns[0]
        if columns == list(range(lo, lo + len(columns))):  # a pipeline stage's layers: a slice
            mine_SBMK = routes_SBMK[:, :, lo : lo + len(columns)]
        else:
            mine_SBMK = routes_SBMK[:, :, columns]
        routes_dev = _to_device(mine_SBMK, device)
        masks_2T = _to_device(torch.stack([replay_SB.reshape(-1), ~pad_SB.reshape(-1)]), device)
        replay_T, valid_T = masks_2T.unbind(0)
        topk = routes_SBMK.shape[-1]
        for j, layer in enumerate(self.layers):
            idx_TK = routes_dev[:, :, j].reshape(-1, topk)
            layer.forward_queue.append(_Target(idx_TK, replay_T, valid_T))
        self.pushed += 1

    def begin(self, action: str | None, *, with_backward: bool) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown routing replay action {action!r}; expected one of {ACTIONS}")
        self.action = action
        self.with_backward = with_backward
        self.pushed = 0
        self.keep_used = False
        for layer in self.layers:
            layer.forward_queue.clear()
            layer.recompute_queue.clear()
            layer.recorded.clear()

    def finish(self) -> None:
        """Check that every pushed route was consumed exactly once per pass, then go idle."""
        problems = []
        for layer in self.layers:
            if layer.forward_queue:
                problems.append(f"layer {layer.moe_index}: {len(layer.forward_queue)} pushed routes never used by a forward")
            if layer.recompute_queue:
                problems.append(f"layer {layer.moe_index}: {len(layer.recompute_queue)} routes never replayed by recomputation")
        self.action = None
        if problems:
            raise RuntimeError("routing replay consumed routes unevenly: " + "; ".join(problems))

    def reset_counts(self) -> None:
        for layer in self.layers:
            layer.counts_C = None


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (host) on ``device`` without making the host wait: pinned, non-blocking on CUDA."""
    device = torch.device(device) if device is not None else t.device
    if device.type == "cpu":
        return t.contiguous()
    if device.type == "cuda":
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)


def attach_routing_replay(model, moe_layer_pattern: list[int]) -> RoutingReplay:
    """Install a :class:`RoutingReplay` on every MoE router of ``model`` (one chunk)."""
    inner = unwrap(model)
    config = inner.config
    moe_globals = [i for i, is_moe in enumerate(moe_layer_pattern) if is_moe]
    controller = RoutingReplay(
        num_moe_layers=len(moe_globals),
        sequence_parallel=bool(config.sequence_parallel),
        route_dtype=storage_dtype(config.num_moe_experts or 1),
        topk=config.moe_router_topk,
    )
    # Routers are found by their global layer index (Megatron's layer_number), so any pipeline
    # split, uneven first/last stages included, maps each router to its column.
    for global_index, router in moe_routers(inner):
        layer = LayerReplay(controller, global_index)
        install_router_hook(router, layer)
        controller.layers.append(layer)
        controller.moe_columns.append(moe_globals.index(global_index))
    setattr(inner, _ATTR, controller)
    return controller


def routing_replay_of(model) -> RoutingReplay | None:
    return getattr(unwrap(model), _ATTR, None)


@contextlib.contextmanager
def routing_action(model_chunks, action: str | None, *, with_backward: bool):
    """Run one pass with ``action`` on every chunk.

    ``with_backward`` says whether the pass runs a backward (``run_step`` training) or not
    (``collect_log_probs``, ``forward_only``): with activation recomputation, only a pass with
    a backward must replay each route a second time, and :meth:`RoutingReplay.finish` checks
    exactly that.
    """
    controllers = [c for c in (routing_replay_of(m) for m in model_chunks) if c is not None]
    for c in controllers:
        c.begin(action, with_backward=with_backward)
    try:
        yield controllers
    except BaseException:
        for c in controllers:
            c.action = None
        raise
    for c in controllers:
        c.finish()


def replay_metrics(model_chunks) -> dict[str, float]:
    """Per-layer routing agreement, replay coverage and fallback fraction, summed over ranks.

    Counts are per token seen by a router: SP shards and DP/CP ranks see different tokens and
    are summed; without SP, TP ranks see the same tokens, so their duplicate counts are divided
    out. Every pipeline stage contributes its own layers.
    """
    from megatron.core import parallel_state

    controllers = [c for c in (routing_replay_of(m) for m in model_chunks) if c is not None]
    if not controllers:
        return {}
    num = controllers[0].num_moe_layers
    counted = [(column, layer.counts_C) for c in controllers
               for layer, column in zip(c.layers, c.moe_columns) if layer.counts_C is not None]
    device = counted[0][1].device if counted else None
    table = torch.zeros(num, len(COUNTS), dtype=torch.int64, device=device)
    for column, counts_C in counted:
        table[column] += counts_C
    if dist.is_initialized():
        table = all_reduce_tensor(table)
    # The one read of the counts: once per step, after the collective.
    table = table.to("cpu", torch.float64)
    tp = parallel_state.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
    if not controllers[0].sequence_parallel and tp > 1:
        table /= tp
    out: dict[str, float] = {}
    tokens, replayed, agree, fallback = table.unbind(1)
    seen = tokens > 0
    for column in range(num):
        if seen[column] and replayed[column] > 0:
            out[f"routing/agreement_moe{column}"] = float(agree[column] / replayed[column])
    if seen.any():
        out["routing/agreement_mean"] = float(agree.sum() / replayed.sum().clamp_min(1))
        out["routing/coverage"] = float(replayed.sum() / tokens.sum())
        out["routing/fallback_frac"] = float(fallback.sum() / tokens.sum())
    return out


def recorded_sample_routes(model_chunks, microbatches, *, include_last: bool = False) -> list[torch.Tensor]:
    """Turn the routes kept during a pass into per-sample tensors.

    R2 uses it after a ``"record"`` pass (the live routes); with ``keep_used`` set, it returns
    the routes the routers actually used in a ``"replay"`` pass (the parity check).

    Returns one ``[N_i - 1, M, K]`` tensor per sample (microbatch order), in the compact dtype
    of the rollout batch's routes (``compact.storage_dtype``): tokens ``0 .. N_i - 2``, the form
    a rollout engine returns (see ``Sample.routes``). ``include_last`` adds the last token's
    row (``N_i`` rows): the embedded rollout engine needs it, because the token it feeds next is
    that last one. Only this rank's MoE layers are filled (a pipeline stage replays its own
    layers only; the others hold zeros); sequence-parallel shards are gathered over TP first.
    Per microbatch, this rank's layers come to the host in ONE copy (per sample and layer, the
    host would wait for the device every time), after the pass rather than inside it.
    """
    controllers = [c for c in (routing_replay_of(m) for m in model_chunks) if c is not None]
    if not controllers:
        raise ValueError("no routing replay is attached to these model chunks")
    num, dtype = controllers[0].num_moe_layers, controllers[0].route_dtype
    layers = [(layer, column, c) for c in controllers for layer, column in zip(c.layers, c.moe_columns)]
    for layer, _, _ in layers:
        if len(layer.recorded) != len(microbatches):
            raise RuntimeError(
                f"MoE layer {layer.moe_index} recorded {len(layer.recorded)} microbatches, "
                f"expected {len(microbatches)}"
            )
    columns = torch.tensor([column for _, column, _ in layers], dtype=torch.long)
    sequence_parallel = any(c.sequence_parallel for _, _, c in layers)
    samples: list[torch.Tensor] = []
    for i, mb in enumerate(microbatches):
        B, S = mb.tokens.shape
        lengths = ((mb.sample_index >= 0).sum(1) + int(include_last)).tolist()
        starts = mb.sample_index[:, 0].tolist()
        # A pipeline stage without MoE layers returns zeros of the right shape.
        topk = layers[0][0].recorded[i].shape[1] if layers else controllers[0].topk
        routes_SBLK = torch.zeros(S, B, 0, topk, dtype=dtype)
        if layers:
            local_TLK = torch.stack([layer.recorded[i] for layer, _, _ in layers], dim=1)
            if sequence_parallel:
                local_TLK = _gather_sequence(local_TLK)
            routes_SBLK = local_TLK.cpu().view(S, B, len(layers), topk)
        for b, (n, first) in enumerate(zip(lengths, starts)):
            flat = first + torch.arange(n)
            out = torch.zeros(n, num, topk, dtype=dtype)
            out[:, columns] = routes_SBLK[flat % S, flat // S]
            samples.append(out)
    return samples


def _gather_sequence(local_TLK: torch.Tensor) -> torch.Tensor:
    """The sequence-parallel shards of every TP rank, concatenated (one collective). Narrow
    integer dtypes travel as bytes, which every backend gathers."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    raw = local_TLK.contiguous().view(torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, raw, group=group)
    return torch.cat(parts).view(local_TLK.dtype)
