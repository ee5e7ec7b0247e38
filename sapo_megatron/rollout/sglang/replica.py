"""The SGLang engine as the trainer's ranks see it: one client per data-parallel replica, one
weight sync over all ranks, and the never-stale checks between them.

Under torchrun, the first rank of each data-parallel replica (its TP x PP x CP ranks:
:func:`sapo_megatron.parallel.replica_group`) sends that replica's requests and broadcasts the
results to the whole replica; rank 0 (itself a leader) also drives the weight sync, which is
collective over every rank (:mod:`.weight_sync`). Not Megatron's model-parallel group, which is
TP x PP only: under CP each CP rank would lead, and since SGLang ignores ``sampling_seed``
without deterministic inference, the CP ranks of one sequence would hold different samples.

Never stale: the policy version is the number of RL steps completed; the trainer pushes version
``v`` (``begin`` at start, then after each step) and every leader then expects
``weight_version == str(v)`` in each response. Before each rollout every leader asks its
servers for their version; after it, the servers whose responses came back with another
version are known. Either way, those servers (restarted, or they missed an update) are re-synced
to the current version, which the trainer still holds during a rollout, and their stale
responses were never returned (retried on another server). A server down during those checks
may come back restarted before the next push: the push asks the versions first and rebuilds
what the sync keeps per server (the distributed group). ``sglang/resynced_servers`` counts the
events.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

import torch.distributed as dist

from sapo_megatron.rollout.base import RolloutResult, SamplingParams


class ReplicaSGLang:
    def __init__(self, make_engine: Callable[[], object], make_sync: Callable[[object], object]):
        from sapo_megatron.parallel import replica_group

        self.group = replica_group()  # collective under CP: every rank builds its engine
        self.leader = dist.get_process_group_ranks(self.group)[0]
        self.is_leader = dist.get_rank() == self.leader
        self.engine = make_engine() if dist.get_rank() in (self.leader, 0) else None
        self.sync = make_sync(self.engine if dist.get_rank() == 0 else None)
        self.version: int | None = None
        self._model = None
        self._counters: Counter = Counter()
        self._pool: ThreadPoolExecutor | None = None
        self._pending = None
        self._pool_futures: dict | None = None  # partial rollouts: key -> the group's request futures
        self._done_at: float | None = None
        self.idle_s = self.generate_s = 0.0

    def begin(self, model_chunks, version: int) -> None:
        """Push the trainer's starting weights as ``version`` (0, or the resumed step)."""
        self.update_weights(model_chunks, version)

    def generate(self, prompts, params: SamplingParams, *, return_routes: bool,
                 routes_start: list[int] | None = None) -> list[RolloutResult]:
        self._resync_stale()
        box = [None]
        if self.is_leader:
            box = [self.engine.generate(prompts, params, return_routes=return_routes, routes_start=routes_start)]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        self._resync_stale()  # servers found stale during this call serve again before the next
        return box[0]

    # Asynchronous use (rollout.max_staleness > 0, trainer/loop.py): the leader's HTTP requests
    # run on one background thread; every torch.distributed call (the stale-server re-sync, the
    # results' broadcast) stays on the main thread, in submit() and collect().
    def submit(self, prompts, params: SamplingParams, *, return_routes: bool) -> None:
        """Start generating on a background thread (leader only; HTTP only); returns at once."""
        self._resync_stale()
        if not self.is_leader:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-rollout")
        now = time.perf_counter()
        # Worker idle since its last batch: the rollout side waiting on the trainer.
        self.idle_s = now - self._done_at if self._done_at is not None else 0.0

        def work():
            start = time.perf_counter()
            try:
                return self.engine.generate(prompts, params, return_routes=return_routes)
            finally:
                self._done_at = time.perf_counter()
                self.generate_s = self._done_at - start

        self._pending = self._pool.submit(work)

    def drain(self) -> None:
        """Wait until the submitted generation is done (no collective): SGLang answers
        /flush_cache with 400 while requests run, so a weight sync must not start before."""
        if self._pending is not None:
            self._pending.exception()  # blocks; an error is raised by collect()

    def collect(self) -> list[RolloutResult]:
        """The submitted generation's results on every rank of the group (a broadcast)."""
        box = [None]
        if self.is_leader:
            box = [self._pending.result()]
            self._pending = None
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        self._resync_stale()
        return box[0]

    # Partial rollouts (rollout.partial, trainer/partial.py): a pool of groups generates across
    # weight updates; each step takes the first groups to complete. Keys name the groups; the
    # leader holds one future per request; results are broadcast to the replica on take.
    def submit_groups(self, groups: list[tuple[object, list[list[int]]]], params: SamplingParams, *,
                      return_routes: bool) -> None:
        """Start generating ``groups`` = [(key, prompts)] (leader: HTTP only); returns at once."""
        self._resync_stale()
        if not self.is_leader:
            return
        if self._pool_futures is None:
            self._pool_futures = {}
        self.engine.accept_spans = True
        for key, prompts in groups:
            self._pool_futures[key] = self.engine.start(prompts, params, return_routes=return_routes)

    def take_groups(self, keys: list, quota: int) -> list[tuple[object, list[RolloutResult]]]:
        """The first ``quota`` groups of ``keys`` (oldest first) whose every request is done,
        waiting until that many are; on every rank of the replica (a broadcast)."""
        box = [None]
        if self.is_leader:
            pool = self._pool_futures or {}
            while True:
                done = [k for k in keys if all(f.done() for f in pool[k])]
                if len(done) >= min(quota, len(keys)):
                    break
                waiting = [f for k in keys if k not in done for f in pool[k] if not f.done()]
                wait(waiting, return_when=FIRST_COMPLETED)
            chosen = done[:quota]
            box = [[(k, [f.result()[0] for f in pool.pop(k)]) for k in chosen]]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        self._resync_stale()
        return box[0]

    def _stale_everywhere(self) -> list[str]:
        """Collective: the servers any leader knows or finds stale now."""
        mine = self.engine.stale_servers() if self.is_leader else []
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return sorted({url for urls in everyone for url in urls})

    def _resync_stale(self) -> None:
        if self.version is None or self._model is None:
            return
        stale = self._stale_everywhere()
        if not stale:
            return
        synced = self.sync.resync(self._model, self.version, stale)
        self._counters["resynced_servers"] += len(set(stale) & set(synced))
        if self.engine is not None:
            self.engine.mark_synced(synced)

    def update_weights(self, model_chunks, version: int, *, pause: str | None = None) -> None:
        """Collective: every server serves ``version`` afterwards (or stays marked stale).

        The servers are asked for their versions first: one that restarted since the last check
        (it may have been down then) is not in the state the sync left it in (the distributed
        group lost its rank), so the push is told to rebuild; it then counts as re-synced.

        ``pause`` (partial rollouts): the trainer's side of the push (export, diff, files:
        ``WeightSync.prepare``) is done first, while the servers keep generating; then rank 0
        pauses every server with that mode (``in_place``: the requests stay in the running batch,
        the update is sent without a flush; ``retract``: they go back to the queue and are
        re-prefilled, the update flushes), loads, and continues generation; the requests in
        flight finish under the new weights. The pause covers the load alone (SGLang's watchdog
        and the requests' latency see only that)."""
        self._model = model_chunks
        stale = self._stale_everywhere() if self.version is not None else []
        prepared = self.sync.prepare(model_chunks, version, rebuild=bool(stale))
        paused = pause is not None and dist.get_rank() == 0
        if paused:
            self.engine.pause_generation(pause)
            self.engine.flush_on_update = pause != "in_place"
        try:
            synced = self.sync.push(model_chunks, version, rebuild=bool(stale), prepared=prepared)
        finally:
            if paused:
                self.engine.flush_on_update = True
                self.engine.continue_generation()
        self._counters["resynced_servers"] += len(set(stale) & set(synced))
        self.version = version
        if self.engine is not None:
            self.engine.expect(version)
            self.engine.mark_synced(synced)
            self.engine.mark_stale(set(self.engine.config.urls) - set(synced))

    def step_metrics(self) -> dict[str, float]:
        """Collective: this step's counters summed over the replicas' clients."""
        mine = Counter(self.engine.take_metrics()) if self.is_leader else Counter()
        if dist.get_rank() == 0:
            mine.update({f"sglang/{k}": float(v) for k, v in self._counters.items()})
            mine.update(getattr(self.sync, "take_metrics", dict)())  # e.g. delta bytes, fallbacks
            self._counters.clear()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, dict(mine))
        total: Counter = Counter()
        for part in everyone:
            total.update(part)
        for key in ("sglang/stale_responses", "sglang/resynced_servers", "sglang/retracted"):
            total.setdefault(key, 0.0)
        return dict(total)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.sync.close()
        if self.engine is not None:
            self.engine.close()
