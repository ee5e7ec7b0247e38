"""Buckets in shared memory: holders on rank 0's host write their parts in place, nothing is sent.

Why: on a CPU host (gloo) the exchange (:meth:`~sapo_megatron.checkpoint.live.ExportPlan.exchange`)
sends every other holder's part of each tensor to rank 0 over loopback TCP. Each of those bytes
is copied by the kernel twice and costs CPU on both ends, while rank 0 broadcasts the previous
bucket over TCP too: at TP=2 one and a half times the model's bytes cross loopback per push, and
on a small host the assembly competes with the broadcast it should hide behind. A holder that
maps the bucket writes its part straight into it (casting there), one copy per byte as before,
and no byte goes through a socket. Holders on other hosts keep using the exchange, in the same
bucket.

Set-up (:meth:`SharedBuckets.open`, once per sync, collective over all ranks): rank 0 creates a
file in ``/dev/shm`` of two buckets, reserves its pages (``posix_fallocate``: a ``/dev/shm`` too
small for it, such as Docker's 64 MB default, fails here with a warning rather than with a
SIGBUS in the middle of a push) and writes a random nonce into it. Every other rank that holds
parts of the buckets (a data-parallel replica holds none: nothing is set up when only rank 0
writes) tries to map the file and checks the nonce: the ranks that can are on rank 0's host,
whatever their hostname says (a container with a ``/dev/shm`` of its own fails the check, as it
should). Rank 0 unlinks
the file as soon as every rank has answered, so a crash or a kill later leaves nothing behind in
``/dev/shm``: the mappings keep the memory until the processes end. The ranks that mapped it and
rank 0 form a gloo subgroup (``dist.new_group``, which every rank calls).

Per bucket (:meth:`SharedBuckets.barrier`, twice): buffer ``k % 2`` may still be broadcasting
bucket ``k - 2`` when a fast holder wants to write bucket ``k`` into it. Rank 0 enters the first
barrier only once that broadcast has finished (the sync calls it when it starts assembling
bucket ``k``), the holders write after it; rank 0 enters the second after its own copies and
receives, the holders after their writes, and rank 0 broadcasts only after it. So no holder ever
writes a buffer in flight and rank 0 never broadcasts a half-written one. A barrier over the
subgroup costs a few small messages, next to a bucket of tens of MB.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
_NONCE = 16
_ALIGN = 4096  # the second buffer starts on a page


class SharedBuckets:
    """Two bucket buffers of ``size`` bytes in memory shared by rank 0 and ``members`` (the
    ranks on its host), and the subgroup whose barriers order their writes."""

    def __init__(self, size: int, members: list[int], group, buffers: list[torch.Tensor], path: str) -> None:
        self.size = size
        self.members = frozenset(members)  # rank 0 included
        self.group = group
        self.buffers = buffers  # empty on the ranks that did not map it
        self.path = path  # unlinked once everyone answered; kept to show it is gone

    @property
    def mapped(self) -> bool:
        return bool(self.buffers)

    def barrier(self) -> None:
        """Collective over ``members`` only (the other ranks must not call it)."""
        dist.barrier(group=self.group)

    def close(self) -> None:
        """Drops this rank's mapping (the memory goes once no tensor views it)."""
        self.buffers = []

    @classmethod
    def open(cls, size: int, tag: str, writers: set[int]) -> SharedBuckets | None:
        """Collective over all ranks. ``writers``: the ranks other than 0 that hold parts of the
        buckets (the same set on every rank; the others, a data-parallel replica say, have
        nothing to write and stay out). None on every rank when none of them shares rank 0's
        memory (on other hosts, or no room in ``/dev/shm``); otherwise the same members
        everywhere, buffers on rank 0 and the members."""
        if not writers:
            return None
        size = -(-size // _ALIGN) * _ALIGN
        rank = dist.get_rank()
        found: list = [None, None]
        mapping, path = None, None
        try:
            if rank == 0:
                path, nonce, mapping = _create(size, tag)
                found = [path, nonce]
            dist.broadcast_object_list(found, src=0)
            if rank in writers and found[0] is not None:
                mapping = _attach(found[0], found[1], 2 * size)
            mapped: list = [None] * dist.get_world_size()
            dist.all_gather_object(mapped, mapping is not None)
        finally:
            if path is not None:
                os.unlink(path)  # everyone who can has it mapped (or the set-up failed)
        members = [r for r, ok in enumerate(mapped) if ok]
        if len(members) < 2 or not mapped[0]:
            return None
        group = dist.new_group(members, backend="gloo")  # every rank calls new_group
        buffers = []
        if mapping is not None:
            whole = torch.frombuffer(mapping, dtype=torch.uint8)
            buffers = [whole[:size], whole[size:]]
        logger.info("weight sync: ranks %s write their parts of each bucket into shared memory (%d bytes x 2)",
                    members, size)
        return cls(size, members, group, buffers, found[0])


def _create(size: int, tag: str):
    """Rank 0's file of two buckets: (path, nonce, mapping), or (None, None, None) with a warning."""
    if not os.path.isdir(SHM_DIR):
        logger.warning("weight sync: no %s on this host; holders send their parts over the process group",
                       SHM_DIR)
        return None, None, None
    path = os.path.join(SHM_DIR, f"sapo-wsync-{tag}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        logger.warning("weight sync: cannot create %s (%s); holders send their parts over the process group",
                       path, err)
        return None, None, None
    try:
        os.posix_fallocate(fd, 0, 2 * size)
        mapping = mmap.mmap(fd, 2 * size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        os.close(fd)
        os.unlink(path)
        logger.warning("weight sync: cannot reserve %d bytes in %s (%s); holders send their parts over the "
                       "process group (raise the container's --shm-size, or set "
                       "rollout.sglang.distributed.shared_memory: false)", 2 * size, SHM_DIR, err)
        return None, None, None
    os.close(fd)  # the mapping stays
    nonce = secrets.token_bytes(_NONCE)
    mapping[:_NONCE] = nonce
    return path, nonce, mapping


def _attach(path: str, nonce: bytes, nbytes: int):
    """This rank's mapping of rank 0's file, or None when it is not on rank 0's host (no such
    file, or a file of that name that is not rank 0's)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != nbytes:
            return None
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if mapping[:_NONCE] != nonce:
        mapping.close()
        return None
    return mapping
