"""Process-group set-up: torch.distributed plus Megatron-Core's model-parallel groups.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / MASTER_ADDR from the environment) and in a
single process (world of one, a loopback rendezvous). On CPU the backend is gloo and the CPU
compatibility layer is activated here, so every entry point that initialises parallelism gets
it without having to remember.

Replicas. A data-parallel replica is the set of ranks that hold one copy of the model and the
same data: TP x PP x CP (:func:`replicas`). Megatron-Core has no group for it (its
"model-parallel" group is TP x PP, one CP rank's share), so :func:`replica_group` builds one under
CP: the SGLang engine's leader broadcasts a replica's samples over it. An expert-parallel group
that holds ranks of several replicas ties their forwards together
(:func:`expert_exchange_spans_replicas`): the embedded rollout engine then steps them in lockstep.
"""

from __future__ import annotations

import datetime
import math
import os
import socket

import torch
import torch.distributed as dist

from sapo_megatron.mcore import activate_cpu_compat
from sapo_megatron.models.config import ParallelConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, *, timeout_s: float | None = None) -> None:
    """Initialise the default process group once (idempotent); ``timeout_s``: its collectives'
    timeout (None: torch's default)."""
    if dist.is_initialized():
        return
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        activate_cpu_compat()
    backend = backend or ("gloo" if on_cpu else "nccl")
    if "RANK" not in os.environ:
        # A single process outside torchrun: a world of one on loopback.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)


def model_parallel_sizes(parallel: ParallelConfig) -> dict[str, int | None]:
    """``parallel``'s sizes as Megatron's ``parallel_state.initialize_model_parallel`` takes them."""
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def initialize_model_parallel(parallel: ParallelConfig, *, seed: int = 1234, timeout_s: float | None = None) -> None:
    """Create Megatron-Core's TP/PP/EP/CP/DP groups for ``parallel`` and seed the RNGs.

    ``timeout_s``: the collectives' timeout in every group (None: torch's and Megatron's 30
    minutes). The trainer raises it above its phase limits (``trainer/watchdog.py``).
    """
    from megatron.core import parallel_state, tensor_parallel

    init_distributed(timeout_s=timeout_s)
    world = dist.get_world_size()
    if world % parallel.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = "
            f"{parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size} x "
            f"{parallel.context_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    minutes = {} if timeout_s is None else {"distributed_timeout_minutes": math.ceil(timeout_s / 60)}
    parallel_state.initialize_model_parallel(**model_parallel_sizes(parallel), **minutes)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def replicas() -> list[list[int]]:
    """The global ranks of every data-parallel replica, by DP rank (a world object all-gather)."""
    from megatron.core import parallel_state

    dp_ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, parallel_state.get_data_parallel_rank())
    out: list[list[int]] = [[] for _ in range(max(dp_ranks) + 1)]
    for rank, dp_rank in enumerate(dp_ranks):
        out[dp_rank].append(rank)
    return out


_REPLICA_GROUP: dict = {}


def replica_group():
    """This rank's replica (TP x PP x CP) as a process group.

    Without CP it is Megatron's model-parallel group. Under CP it is built here, one group per
    replica, on the first call after ``initialize_model_parallel``: that call is collective
    over the world (``new_group``), later ones are not.
    """
    from megatron.core import parallel_state

    model_parallel = parallel_state.get_model_parallel_group()
    if parallel_state.get_context_parallel_world_size() == 1:
        return model_parallel
    if _REPLICA_GROUP.get("built_for") is not model_parallel:
        groups = [dist.new_group(ranks) for ranks in replicas()]
        _REPLICA_GROUP.update(built_for=model_parallel, group=groups[parallel_state.get_data_parallel_rank()])
    return _REPLICA_GROUP["group"]


def expert_exchange_spans_replicas() -> bool:
    """Whether a MoE layer's token exchange runs over ranks of more than one DP replica.

    Megatron-Core's token dispatchers exchange tokens over the expert tensor x expert model
    group (the allgather dispatcher all-gathers over it, the all-to-all one exchanges over
    its EP part) in every MoE layer's forward. When that group holds ranks of several replicas
    (EP=2 with TP=1 on two ranks: each rank is a replica), no replica can run a forward without
    the others. The same answer on every rank (world object all-gathers).
    """
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return False  # no groups (a single process without Megatron's): nothing is exchanged
    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return False
    replica_of = {rank: i for i, ranks in enumerate(replicas()) for rank in ranks}
    groups: list = [None] * dist.get_world_size()
    mine = dist.get_process_group_ranks(parallel_state.get_expert_tensor_and_model_parallel_group())
    dist.all_gather_object(groups, mine)
    return any(len({replica_of[rank] for rank in group}) > 1 for group in groups)


def destroy() -> None:
    from megatron.core import parallel_state

    _REPLICA_GROUP.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
