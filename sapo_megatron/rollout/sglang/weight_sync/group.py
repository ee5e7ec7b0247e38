"""The trainer's side of SGLang's weight-update process group, built the way SGLang builds it.

SGLang (``sglang/srt/utils/common.py: init_custom_process_group``, 0.5.23) joins at
``rank_offset + tp_rank`` through ``rendezvous("tcp://addr:port", rank, world_size)``, wraps the
store in ``PrefixStore(group_name, store)`` and creates a process group on it with
``_new_process_group_helper``, outside the default group (which on the trainer is the trainer's
own world). Any other construction (``dist.new_group``, another store prefix) never meets the
servers at the rendezvous, so this mirrors those steps one for one; rank 0 hosts the TCP store.

Abandoning a join. With gloo, creating the group waits in the store until every server has
joined, for the group's timeout (``weight_timeout_s``, 30 minutes by default). A server that
refuses the group (a name it already holds, say) answers its HTTP request at once but never
joins, and the store has no way to say so. So :func:`join` runs the trainer's side on a thread
while the caller watches the servers' answers, and rank 0 hosts the store in an object of its
own (:class:`Rendezvous`), apart from the client store the group is built on: closing that
object (dropping the only reference) shuts the store's server, and every wait on it, the
trainer's and the servers', fails within milliseconds (measured: 0.08 s) instead of running into
the timeout. The store lives as long as the group (NCCL exchanges its ids through it at the
first broadcast).
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

logger = logging.getLogger(__name__)
POLL_S = 0.01
# How long an abandoned join may take to notice that its store is gone (milliseconds in practice).
ABANDON_S = 30.0


class JoinAbandoned(RuntimeError):
    """The caller gave up on the group before it was built (a server refused it)."""


class Rendezvous:
    """Rank 0's TCP store for one group, hosted here before any server is asked to join (a port
    that cannot be bound fails before a request goes out). ``rendezvous("tcp://...", rank=0)``
    would host it, except under torchrun: there (TORCHELASTIC_USE_AGENT_STORE) it turns every
    rank into a client of an agent store that does not exist for this group. The servers'
    ``rendezvous`` connects to it as clients, exactly as to a rendezvous master. Nothing waits
    here for them (``wait_for_workers=False``): the group's creation does, on a client, where
    :meth:`close` can end that wait."""

    def __init__(self, host: str, port: int, timeout: timedelta) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._store = dist.TCPStore(host, port, None, is_master=True, wait_for_workers=False, timeout=timeout,
                                    multi_tenant=False)

    def close(self) -> None:
        self._store = None  # the only reference: the store's server shuts down, its waits fail


class Group:
    """Rank 0's side of one weight-update group: the process group and the store it meets on."""

    def __init__(self, pg, rendezvous: Rendezvous) -> None:
        self.pg = pg
        self.rendezvous = rendezvous

    def close(self) -> None:
        if self.pg is not None:
            dist.destroy_process_group(self.pg)
            self.pg = None
        self.rendezvous.close()


def _create(rendezvous: Rendezvous, *, backend: str, world_size: int, group_name: str):
    """Rank 0 joins as a client of its own store, then builds the group on it as SGLang does."""
    timeout = rendezvous.timeout
    store = dist.TCPStore(rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timeout)
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, 0, [], c10d.Backend(backend), store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    # broadcast(src=0, group=pg) maps ranks through this table, as SGLang sets it.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def join(rendezvous: Rendezvous, *, backend: str, world_size: int, group_name: str,
         give_up: Callable[[], bool]) -> Group:
    """Rank 0's side of the group, met at ``rendezvous`` (which it then owns: closed on any
    failure). ``give_up()`` is asked while the servers join; once it says True the store is
    closed, the join ends and :class:`JoinAbandoned` is raised."""
    box: dict = {}

    def run() -> None:
        try:
            box["pg"] = _create(rendezvous, backend=backend, world_size=world_size, group_name=group_name)
        except Exception as err:
            box["error"] = err

    thread = threading.Thread(target=run, name=f"weight-sync join {group_name}", daemon=True)
    thread.start()
    while thread.is_alive():
        if give_up():
            rendezvous.close()
            thread.join(ABANDON_S)
            if thread.is_alive():
                logger.warning("the abandoned join of weight-sync group %s did not end within %.0f s",
                               group_name, ABANDON_S)
            elif "pg" in box:  # it completed in the meantime: undo it
                dist.destroy_process_group(box["pg"])
            raise JoinAbandoned(f"gave up joining weight-sync group {group_name}")
        thread.join(POLL_S)
    if "error" in box:
        rendezvous.close()
        raise box["error"]
    return Group(box["pg"], rendezvous)


def free_port(host: str = "") -> int:
    """A port free now on this host (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
