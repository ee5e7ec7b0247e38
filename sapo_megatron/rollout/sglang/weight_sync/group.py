"""The trainer's side of SGLang's weight-update process group, built the way SGLang builds it.

SGLang (``sglang/srt/utils/common.py: init_custom_process_group``, 0.5.23) joins at
``rank_offset + tp_rank`` through ``rendezvous("tcp://addr:port", rank, world_size)``, wraps the
store in ``PrefixStore(group_name, store)`` and creates a process group on it with
``_new_process_group_helper``, outside the default group (which on the trainer is the trainer's
own world). Any other construction (``dist.new_group``, another store prefix) never meets the
servers at the rendezvous, so this mirrors those steps one for one; rank 0 hosts the TCP store.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_custom_process_group(*, backend: str, host: str, port: int, world_size: int, group_name: str,
                              timeout: timedelta):
    """Rank 0's side. ``rendezvous("tcp://...", rank=0)`` would host the store, except under
    torchrun: there (TORCHELASTIC_USE_AGENT_STORE) it turns every rank into a client of an agent
    store that does not exist for this group. So rank 0 hosts the same TCPStore explicitly; the
    servers' ``rendezvous`` connects to it as clients, exactly as to a rendezvous master."""
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, multi_tenant=True)
    store.set_timeout(timeout)
    rank = 0
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    # broadcast(src=0, group=pg) maps ranks through this table, as SGLang sets it.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy(pg) -> None:
    if pg is not None:
        dist.destroy_process_group(pg)


def free_port(host: str = "") -> int:
    """A port free now on this host (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
