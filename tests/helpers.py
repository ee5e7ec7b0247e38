"""Helpers only tests use: the parallel layout of a torchrun worker, moving a reference weight
set into any sharded layout and back, and the row convention of routes written out longhand.

They sit on the package's distribution bookkeeping (:mod:`sapo_megatron.step.sharding`:
``global_name``, ``shard_full_tensor``, ``gather_full_tensor``) but no training code needs them:
the distributed tests load the single-rank run's weights into every layout with
:func:`load_full_state_dict`, and gather every rank's gradients into one dict of full tensors
with :func:`gather_full` + :func:`merge_over_ranks` (an object all-gather: small models only).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from sapo_megatron.routing.align import pad_routes
from sapo_megatron.step.sharding import gather_full_tensor, global_name, shard_full_tensor, unwrap


def add_layout_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--tp`` / ``--pp`` / ``--ep`` (and ``--pp-first`` / ``--pp-last``) of a distributed test
    worker (see :func:`init_layout`)."""
    for flag in ("--tp", "--pp", "--ep"):
        ap.add_argument(flag, type=int, default=1)
    # Uneven pipeline stages: the layers of the first / last stage (parallel.num_layers_in_*).
    ap.add_argument("--pp-first", type=int)
    ap.add_argument("--pp-last", type=int)
    return ap


def init_layout(args: argparse.Namespace, *, seed: int):
    """Set up torch.distributed and Megatron's groups for the worker's ``--tp/--pp/--ep``."""
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import initialize_model_parallel

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
        num_layers_in_first_pipeline_stage=getattr(args, "pp_first", None),
        num_layers_in_last_pipeline_stage=getattr(args, "pp_last", None),
    )
    initialize_model_parallel(parallel, seed=seed)
    return parallel


def this_rank_microbatches(samples: list, num_microbatches: int) -> list[list]:
    """This data-parallel rank's share of a step's samples, cut into ``num_microbatches``."""
    from megatron.core import parallel_state

    from sapo_megatron.step.batch import split_step_samples

    return split_step_samples(
        samples,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        num_microbatches=num_microbatches,
    )


def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full (single-rank) tensors into this rank's shards; every local param must be found."""
    inner = unwrap(model)
    missing = []
    with torch.no_grad():
        for name, param in inner.named_parameters():
            gname = global_name(inner, name)
            if gname not in full:
                missing.append(gname)
                continue
            shard = shard_full_tensor(full[gname], param, name, inner.config)
            if shard.shape != param.shape:
                raise ValueError(
                    f"tensor {gname!r} gives a shard of shape {tuple(shard.shape)} for local "
                    f"parameter {name!r}, which has shape {tuple(param.shape)}"
                )
            param.copy_(shard)
    if missing:
        raise ValueError(f"full state dict lacks {len(missing)} parameters, e.g. {missing[:5]}")


def gather_full(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors for this rank's ``{local name: tensor}`` (TP gather only; names global).

    Pipeline and expert ranks each return their own subset of global names; merge with
    :func:`merge_over_ranks`.
    """
    inner = unwrap(model)
    params = dict(inner.named_parameters())
    return {
        global_name(inner, name): gather_full_tensor(t, params[name], name, inner.config).cpu()
        for name, t in tensors.items()
    }


def merge_over_ranks(partial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Union of every rank's dict of full tensors (object all-gather; small models only)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, partial)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def add_fallback_row(
    routes_RMK: torch.Tensor, *, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the last token's row: ``(routes_NMK, replayed_N)`` with ``N = R + 1`` tokens.

    The new row holds ``arange(topk)`` only so that the tensor stays well formed; ``replayed``
    is False there and the token must route live.
    """
    rows, num_moe_layers, topk = routes_RMK.shape
    if num_tokens is not None and rows != num_tokens - 1:
        raise ValueError(
            f"routes have {rows} rows for a sample of {num_tokens} tokens, expected "
            f"{num_tokens - 1} (one per token but the last)"
        )
    filler = pad_routes(1, num_moe_layers, topk, routes_RMK.dtype)
    replayed = torch.ones(rows + 1, dtype=torch.bool)
    replayed[rows] = False
    return torch.cat([routes_RMK, filler]), replayed



class LiveTensorBytes:
    """Peak bytes of host tensor storages alive at once, among those the code inside makes.

    A ``TorchDispatchMode`` sees every tensor an aten op returns (``torch.empty``, copies, and
    the ``set_`` by which ``torch.load`` / DCP reads wrap the storage they read into); each
    storage counts from the first op that returns it until the last such tensor object dies.
    Storages of ``existing`` tensors (a model's parameters, whose views the code inside makes)
    are not counted: only what it allocates. Usage::

        with LiveTensorBytes(existing=model.state_dict().values()) as live:
            export(...)
        live.peak  # bytes
    """

    def __init__(self, existing=()) -> None:
        self.now = self.peak = 0
        self._existing = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensor objects holding it]
        self._seen: set[tuple[int, int]] = set()  # (id(tensor), data_ptr) already counted
        self._mode = None

    def __enter__(self) -> "LiveTensorBytes":
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or ptr in self._existing or (id(t), ptr) in self._seen:
            return
        self._seen.add((id(t), ptr))
        slot = self._storages.setdefault(ptr, [nbytes, 0])
        if slot[1] == 0:
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        slot[1] += 1
        weakref.finalize(t, self._drop, id(t), ptr)

    def _drop(self, key: int, ptr: int) -> None:
        self._seen.discard((key, ptr))
        slot = self._storages.get(ptr)
        if slot is not None:
            slot[1] -= 1
            if slot[1] == 0:
                self.now -= slot[0]
                del self._storages[ptr]
