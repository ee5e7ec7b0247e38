"""``weight_sync: distributed``: SGLang's ``/update_weights_from_distributed``, in flattened buckets.

Protocol (sglang 0.5.23, ``model_runner_components/weight_updater.py``): ``/init_weights_update_group``
once per server; the server joins at ``rank_offset + tp_rank`` (:mod:`.group` builds the trainer's
side, rank 0, the same way). Per bucket, one ``/update_weights_from_distributed`` request with
``names/dtypes/shapes`` and ``load_format: "flattened_bucket"``, while the trainer broadcasts the
bucket's bytes as ONE uint8 tensor from rank 0 (:mod:`.buckets` orders tensors so every offset
is aligned). With ``load_format: None`` each tensor is its own broadcast, as SGLang also accepts.
The last bucket carries ``weight_version`` and ``flush_cache``.

The weight-update session (SGLang >= 0.5.21, by the version in ``/server_info``): such a server
refuses ``/update_weights_from_distributed`` with 400 unless ``/begin_weight_update`` opened a
session, which ``/end_weight_update`` closes (:mod:`..protocol`). Every push (and re-sync)
opens one on each member server that has them before the first bucket and ends it after the
last answer, and also when the push fails (best effort). A session still open when we begin
(a trainer that crashed inside a sync) is ended and opened again, with a warning. Older servers
get neither request (the endpoints answer 404 there).

Design choices:
- One group over all servers: server ``i`` has ``rank_offset = 1 + sum(tp_size of servers < i)``
  (``tp_size`` from ``/server_info``), ``world_size = 1 + sum(tp_size)``, so each bucket leaves
  the trainer once. ``--dp-size > 1`` / ``--pp-size > 1`` servers are refused (SGLang adds no rank
  offset for them): run one server per replica.
- Rejoining: a group's ranks are fixed when it is built, so a server that restarted (or was down)
  cannot take its place back. Any re-sync therefore DESTROYS the group (``/destroy_weights_update_group``
  on the servers that still hold it, ``destroy_process_group`` here) and builds a new one over every
  reachable server, under a new group name (``<group_name>_<run token>_r<n>``), then pushes the whole
  model. A restart is rare; the common step pays nothing for this. A server that is down is left
  out and stays stale until a later sync finds it reachable.
- The group's lifecycle on the servers. A server keeps a group until told to destroy it, and
  refuses a second group of the same name at once (400 "The specified group name has already
  been created", torch's own check). So ``close()`` destroys the group on the servers too, a failed
  push destroys it on both sides at once (best effort: a server still waiting in a broadcast that
  another server refused is released when that server's side goes), and every run names its
  groups with a token of its own: a group that a crashed run left behind (nothing destroyed it)
  never collides with the next run's. Clean-up requests are one attempt each, bounded by
  ``timeout_s``.
- Failing fast. Only rank 0 talks HTTP; the other ranks wait for its outcome (``share_outcome``),
  so a server's failure (4xx, 5xx, a timeout) must end rank 0's wait at once, whatever it waits
  on. The rendezvous is given up as soon as any ``/init_weights_update_group`` answer is a failure
  (:func:`.group.join` closes the store, which ends every wait on it, the servers' too). A
  bucket's broadcast and its answers are watched together, and a refusal raises with the
  server's message without waiting for the servers still inside the broadcast: gloo's tree
  feeds some servers through others, so a server that refused leaves those waiting for their
  group's timeout (30 minutes in SGLang). A failure thus surfaces within one request timeout
  (``weight_timeout_s`` for the weight endpoints), never a store's, broadcast's or group's.
- Assembling on the device, overlapped with the wire: each bucket is ONE preallocated buffer on
  rank 0's device. Every holder of a tensor (TP slices, another expert-parallel or pipeline rank)
  sends its part of each HF tensor straight to rank 0, which receives it into its slice of the
  bucket; rank 0 copies its own parts from its parameters into the bucket (``ExportPlan.exchange``:
  no full tensor, no ``cat``, no split copies, no packing pass). Bucket ``k + 1`` is assembled
  into the second buffer while bucket ``k`` broadcasts (``async_op=True``): two buckets in
  memory, never the model. Bucket ``k + 1``'s request waits for bucket ``k``'s answers, not just
  its broadcast (:meth:`DistributedSync._finish` says why): one HTTP round trip per bucket.
- Holders on rank 0's host write into the bucket instead of sending (``shared_memory``, buckets
  in host memory only): on a CPU host the exchange above is loopback TCP, which copies every
  byte through the kernel twice and takes CPU from the broadcast it should overlap with (at
  TP=2, half the model crossed loopback on top of the broadcast's own bytes). The two buckets
  then live in shared memory that rank 0 and the ranks of its host map (:mod:`.shared`: found by
  mapping rank 0's file, not by hostname; the file is unlinked once mapped, so nothing is left
  in ``/dev/shm``); each holder casts its pieces straight into its view of the bucket, between
  two barriers of their own subgroup that keep it from writing a buffer still broadcasting and
  rank 0 from broadcasting a half-written one. Holders on other hosts still send theirs, in the
  same bucket. GPU buckets (NCCL) are unchanged: there the exchange is device-to-device.
- One source, not one group per pipeline stage: SGLang serialises weight-update requests behind
  its model-update writer lock, so a server receives one bucket at a time whichever stage sends
  it; per-stage groups would only parallelise the gathering, which already overlaps with the
  broadcast, at the cost of one group per stage on every server. Pipeline stages send their
  tensors to rank 0 bucket by bucket instead.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from concurrent.futures import wait
from datetime import timedelta

import torch
import torch.distributed as dist

from sapo_megatron.checkpoint.live import plan_buckets
from sapo_megatron.checkpoint.pieces import carve, piece_nbytes
from sapo_megatron.collectives import group_device
from sapo_megatron.rollout.sglang.protocol import (
    SESSION_ALREADY_OPEN,
    check_server,
    distributed_update_payload,
    init_group_payload,
    weight_session_needed,
)
from sapo_megatron.rollout.sglang.weight_sync import buckets as bk
from sapo_megatron.rollout.sglang.weight_sync.base import WeightSync, share_outcome
from sapo_megatron.rollout.sglang.weight_sync.group import JoinAbandoned, Rendezvous, free_port, join
from sapo_megatron.rollout.sglang.weight_sync.shared import SharedBuckets

logger = logging.getLogger(__name__)
UPDATE = "/update_weights_from_distributed"
BEGIN, END = "/begin_weight_update", "/end_weight_update"
INIT, DESTROY = "/init_weights_update_group", "/destroy_weights_update_group"


class DistributedSync(WeightSync):
    name = "distributed"

    def __init__(self, engine, hf_config: dict, config) -> None:
        self.engine = engine
        self.hf_config = hf_config
        self.section = config.distributed
        self.timeout = timedelta(seconds=config.weight_timeout_s)
        self.group = None  # rank 0's side of the group (group.Group)
        self.members: list[str] = []  # the servers that (may) hold the group named group_name
        self.group_name: str | None = None
        # Unique per run: a group a crashed run left on the servers (nothing destroyed it) never
        # has the name of ours, so the servers never refuse ours for that.
        self.token = secrets.token_hex(3)
        self.generation = 0
        self.rebuilds = 0
        self.sessions: list[str] = []  # servers on which this push opened a weight-update session
        # Seconds of the pushes so far (rank 0 only for wire_wait_s), for benchmarks/bench_weight_sync.py:
        # assembling the buckets (copies and receives), waiting for the broadcast of the previous one.
        self.timings = {"assemble_s": 0.0, "wire_wait_s": 0.0}
        # The shared-memory buckets (shared.py), set up at the first push on a CPU host; False:
        # tried, and no other rank shares rank 0's memory. Bytes this rank wrote into them.
        self.shm: SharedBuckets | None | bool = None
        self.shared_bytes = 0

    @property
    def pg(self):
        return None if self.group is None else self.group.pg

    # ------------------------------------------------------------------ the group (rank 0)
    def _reachable(self, urls: list[str]) -> list[str]:
        up = []
        for url in urls:
            try:
                self.engine.server_info(url, refresh=True)
                up.append(url)
            except RuntimeError as err:
                logger.warning("SGLang server %s left out of the weight sync (stays stale): %s", url, err)
        return up

    def _teardown(self, why: str) -> None:
        """The group gone on both sides (best effort: a restarted server no longer holds it and
        says so). The servers' sides go first: after a failed bucket, rank 0's destroy waits for
        its broadcast still pending to a server that refused it, which ends only when that
        server's side of the group goes (which also releases the servers gloo fed through it)."""
        members, self.members = self.members, []
        if members:
            payload = {"group_name": self.group_name}
            self._best_effort(DESTROY, members, lambda url: payload, why)
        if self.group is not None:
            self.group.close()
            self.group = None

    def _build(self, urls: list[str]) -> None:
        if self.engine.config.concurrency < len(urls):  # a bucket's requests must all be in flight at once
            raise ValueError(f"rollout.sglang.concurrency={self.engine.config.concurrency} is below the {len(urls)} "
                             f"servers of the distributed weight sync: every server must be in each broadcast")
        infos = [self.engine.server_info(u) for u in urls]
        for info in infos:
            check_server(info, require_routes=False, seeded=False, distributed=True)
        offsets, rank = {}, 1
        for info in infos:
            offsets[info.url] = rank
            rank += info.tp_size
        world = rank
        address = self.section.master_address or socket.getfqdn()
        port = self.section.master_port or free_port()
        name = f"{self.section.group_name}_{self.token}" + (f"_r{self.generation}" if self.generation else "")
        self.generation += 1  # a failed attempt's name is not used again either
        what = f"joining the weight-sync group {name} at {address}:{port}"
        rendezvous = Rendezvous(address, port, self.timeout)  # up before any server connects
        # Until the servers answer, any of them may hold the group: a failure tears it down there.
        self.members, self.group_name = list(urls), name
        futures = self.engine.submit_all(
            INIT, lambda url: init_group_payload(master_address=address, master_port=port, rank_offset=offsets[url],
                                                 world_size=world, group_name=name, backend=self.section.backend),
            urls=urls, collective=True)
        try:
            # A server that refuses (a name it holds, a wrong address) answers at once but never
            # joins: the trainer gives up the rendezvous then instead of waiting for its timeout.
            self.group = join(rendezvous, backend=self.section.backend, world_size=world, group_name=name,
                              give_up=lambda: any(map(_failed, futures.values())))
        except Exception as err:
            # The servers still joining fail within milliseconds once the store is gone.
            wait(futures.values(), timeout=self.engine.config.timeout_s)
            self.members = [u for u, f in futures.items() if not _failed(f)]  # a refuser holds no group of ours
            errors = [] if isinstance(err, JoinAbandoned) else [
                f"the trainer's side failed: {type(err).__name__}: {err}"]
            self.engine.collect({u: f for u, f in futures.items() if f.done()}, INIT, what, errors)
            raise RuntimeError(f"{what} failed: {err}") from None
        try:  # with NCCL the trainer's side returns before the servers have tried
            self.engine.collect(futures, INIT, what)
        finally:
            self.members = [u for u, f in futures.items() if not _failed(f)]
        logger.info("weight-sync group %s: trainer rank 0 + %s (world %d)", name,
                    {u: offsets[u] for u in urls}, world)

    def _prepare(self, rebuild: bool) -> list[str]:
        urls = self._reachable(self.engine.config.urls)
        if not urls:
            raise RuntimeError(f"no SGLang server is reachable for the weight sync ({self.engine.config.urls})")
        if rebuild or self.group is None or urls != self.members:
            if self.group is not None:
                self.rebuilds += 1
            self._teardown("rebuilding the group")
            self._build(urls)
        return self.members

    # ------------------------------------------------------------------ the session (rank 0)
    def _open_sessions(self, urls: list[str]) -> None:
        self.sessions = [u for u in urls if weight_session_needed(self.engine.server_info(u))]
        if not self.sessions:
            return
        futures = self.engine.submit_all(BEGIN, lambda url: {}, urls=self.sessions)
        left_open = [u for u, f in futures.items() if _refused_with(f, SESSION_ALREADY_OPEN)]
        if left_open:
            logger.warning("SGLang servers %s hold a weight-update session nobody closed (a trainer that "
                           "crashed inside a sync?): ending it and opening ours", left_open)
            self.engine.on_all_servers(END, lambda url: {}, "ending a weight-update session left open",
                                       urls=left_open)
            futures.update(self.engine.submit_all(BEGIN, lambda url: {}, urls=left_open))
        self.engine.collect(futures, BEGIN, "opening the weight-update session")

    def _close_sessions(self, version: int) -> None:
        urls, self.sessions = self.sessions, []
        if urls:
            self.engine.on_all_servers(END, lambda url: {}, f"closing the weight-update session of version {version}",
                                       urls=urls)

    def _best_effort(self, path: str, urls: list[str], payload_of, why: str) -> None:
        """Clean-up on a failure path: one attempt per server, each bounded by the client's
        request timeout (``timeout_s``); refusals are logged, never raised."""
        futures = self.engine.submit_all(path, payload_of, urls=urls, collective=True,  # one attempt
                                         timeout=self.engine.config.timeout_s)
        for url, future in futures.items():
            try:
                answer = future.result()
            except Exception as err:
                answer = {"message": f"{type(err).__name__}: {err}"}
            if not (isinstance(answer, dict) and answer.get("success")):
                reason = answer.get("message", answer) if isinstance(answer, dict) else answer
                logger.info("%s on %s (%s): %s", path, url, why, reason)

    def _fail(self) -> None:
        """What a failed push leaves on the servers, closed (best effort): the group first (a
        server still waiting in a broadcast that another server refused is released when that
        one's side of the group goes), then the sessions."""
        self._teardown("the push failed")
        urls, self.sessions = self.sessions, []
        if urls:
            self._best_effort(END, urls, lambda url: {}, "the push failed")

    # ------------------------------------------------------------------ one push (all ranks)
    def push(self, model, version: int, *, rebuild: bool = False, prepared=None) -> list[str]:
        from sapo_megatron.checkpoint.live import export_plan

        plan = export_plan(model, self.hf_config, "checkpoint")
        device = next(iter(plan.local.values()))[2].device if plan.local else torch.device("cpu")
        error, members = None, []
        if dist.get_rank() == 0:
            try:
                members = self._prepare(rebuild)
                self._open_sessions(members)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        share_outcome(error, members)  # every rank raises if the group or a session could not be opened

        buckets = plan_buckets(plan.entries, self.section.bucket_bytes)
        # Two buckets' worth of memory on rank 0, reused: bucket k + 1 is assembled into one while
        # bucket k broadcasts from the other.
        size = max(sum(e.hf_nbytes for e in b) for b in buckets)
        shm = self._shared(size, plan)
        if shm is not None:
            buffers = shm.buffers  # rank 0's and its host's holders' views of the same memory
        else:
            buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)] if dist.get_rank() == 0 else []
        in_flight = None
        for k, bucket in enumerate(buckets):
            t0 = time.perf_counter()
            metas = self._assemble(plan, bucket, buffers[k % 2] if buffers else None, shm)
            self.timings["assemble_s"] += time.perf_counter() - t0
            if dist.get_rank() != 0 or error:
                continue
            try:
                t0 = time.perf_counter()
                if in_flight is not None:
                    self._finish(in_flight, version)
                self.timings["wire_wait_s"] += time.perf_counter() - t0
                in_flight = self._start(metas, buffers[k % 2], version, last=k == len(buckets) - 1)
            except Exception as err:
                error, in_flight = f"{type(err).__name__}: {err}", None
        if in_flight is not None and not error:
            try:
                t0 = time.perf_counter()
                self._finish(in_flight, version)
                self.timings["wire_wait_s"] += time.perf_counter() - t0
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        if dist.get_rank() == 0 and not error:
            try:
                self._close_sessions(version)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        if dist.get_rank() == 0 and error:
            self._fail()
        if dist.get_rank() == 0 and not error:
            logger.info("SGLang servers serve version %d (%d buckets over %s)", version, len(buckets), self.group_name)
        return share_outcome(error, members if not error else [])

    def resync(self, model, version: int, urls: list[str]) -> list[str]:
        return self.push(model, version, rebuild=True)

    def _shared(self, size: int, plan) -> SharedBuckets | None:
        """The shared-memory buckets when they apply (``shared_memory``, buckets in host memory);
        collective, the same answer on every rank. Set up once (again only for larger buckets)."""
        if not self.section.shared_memory or group_device().type != "cpu" or dist.get_world_size() < 2:
            return None
        if self.shm is None or (self.shm and self.shm.size < size):
            if self.shm:
                self.shm.close()
            writers = {p.rank for e in plan.entries for p in plan.pieces(e, 0)} - {0}
            self.shm = SharedBuckets.open(size, self.token, writers) or False
        return self.shm or None

    def _assemble(self, plan, bucket, buffer, shm: SharedBuckets | None) -> list[bk.Meta]:
        """Collective: the bucket's HF tensors written into ``buffer`` on rank 0 in aligned
        order, each byte copied or received once; returns their metas. ``buffer`` is None on
        the other ranks, except those mapping the shared-memory buckets (``shm``): they write
        their own pieces into it, between two barriers (:mod:`.shared` says why)."""
        metas = [meta for entry in bucket for meta in entry.hf]
        metas = [metas[i] for i in bk.aligned_order(metas)]
        dests = None
        if buffer is not None:
            dests = {name: view for (name, _, _), view in zip(metas, carve(buffer, metas))}
        mapped = shm is not None and shm.mapped
        if mapped:
            shm.barrier()  # rank 0 is here once the buffer's previous broadcast has finished
        plan.exchange(bucket, 0, dests, shared=shm.members if shm is not None else frozenset())()
        if mapped:
            shm.barrier()  # every holder's writes are in
            rank = dist.get_rank()
            if rank != 0:
                self.shared_bytes += sum(piece_nbytes(p, e.hf[p.hf][2], e.hf[p.hf][1])
                                         for e in bucket for p in plan.pieces(e, 0) if p.rank == rank)
        return metas

    def _start(self, metas, buffer, version: int, *, last: bool):
        load_format = self.section.load_format
        names, dtypes, shapes = zip(*metas)
        payload = distributed_update_payload(list(names), list(dtypes), list(shapes), group_name=self.group_name,
                                             load_format=load_format, last=last, version=version)
        futures = self.engine.submit_all(UPDATE, lambda url: payload, urls=self.members, collective=True)
        if load_format == "flattened_bucket":
            wire = [buffer[: sum(map(bk.nbytes, metas))]]
        else:
            wire = carve(buffer, metas)  # each a contiguous view: one broadcast per tensor
        works = [dist.broadcast(t, src=0, group=self.pg, async_op=True) for t in wire]
        return futures, works, wire

    def _finish(self, in_flight, version: int) -> None:
        """Wait until one bucket is broadcast and every server has answered it; the first
        failure raises at once (a server that refuses never enters the broadcast).

        The next bucket's request goes out only after these answers. A broadcast completes on
        rank 0 once the ranks it sends to directly have received it, and gloo's tree feeds the
        others through them (over 4 ranks, rank 3 through rank 1): a server that refused can sit
        behind a broadcast that is done here. The next request sent to it would receive this
        bucket's bytes, relayed, as the next bucket's; gloo aborts the server process on the size
        mismatch, and equal sizes would load the wrong weights."""
        futures, works, _wire = in_flight
        what = f"weight update to version {version}"
        deadline = time.monotonic() + self.timeout.total_seconds()
        # Woken by each completion rather than polled: on a loaded host a polling loop takes CPU
        # from the broadcast it waits for. The event is cleared BEFORE the checks, so a
        # completion between a check and the wait still ends the wait.
        woken = threading.Event()
        sent = [w.get_future() for w in works]
        for f in [*sent, *futures.values()]:
            f.add_done_callback(lambda _f: woken.set())
        while True:
            woken.clear()
            if any(map(_failed, futures.values())) or time.monotonic() > deadline:
                self._refused(futures, what)
            if all(f.done() for f in sent) and all(f.done() for f in futures.values()):
                break
            woken.wait(max(0.0, min(1.0, deadline - time.monotonic())))
        for w in works:
            w.wait()
        self.engine.collect(futures, UPDATE, what)

    def _refused(self, futures, what: str) -> None:
        """Raise with the answers already in (the servers' own messages); the servers still
        inside the broadcast are named, never waited for."""
        waiting = [u for u, f in futures.items() if not f.done()]
        note = f"; no answer yet from {', '.join(waiting)} (inside the broadcast)" if waiting else ""
        try:
            self.engine.collect({u: f for u, f in futures.items() if f.done()}, UPDATE, what)
        except RuntimeError as err:
            raise RuntimeError(f"{err}{note}") from None
        raise RuntimeError(f"{what} failed: the broadcast did not complete{note}")

    def close(self) -> None:
        """Rank 0 destroys the group on both sides (best effort, each request bounded by
        ``timeout_s``), so the servers hold nothing of this run; the other ranks hold nothing."""
        if self.shm:
            self.shm.close()
        self.shm = None
        if self.engine is not None:
            self._teardown("closing the weight sync")


def _failed(future) -> bool:
    """The request is answered and failed (an HTTP error, or ``success: false``)."""
    if not future.done():
        return False
    if future.exception() is not None:
        return True
    answer = future.result()
    return not (isinstance(answer, dict) and answer.get("success"))


def _refused_with(future, text: str) -> bool:
    """The request was answered ``success: false`` with a message containing ``text``."""
    if future.exception() is not None:
        return False
    answer = future.result()
    return isinstance(answer, dict) and not answer.get("success") and text in str(answer.get("message"))
