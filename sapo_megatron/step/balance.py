"""Balance a minibatch's samples over data-parallel ranks by tokens, and move them there.

Why: each DP rank generates for its own prompts, so with long-tailed response lengths one rank
can hold twice the tokens of another, and every rank then waits for the slowest at the
gradient all-reduce. Peers (slime/miles, verl, NeMo-RL, SkyRL) repartition by tokens with
Karmarkar-Karp; so do we.

Two parts, kept apart:

- :func:`karmarkar_karp` (pure): the largest-differencing method for ``k`` parts. Every item
  starts as a partial partition; the two partitions with the largest spread (max - min part
  sum) are merged by joining the heaviest part of one with the lightest of the other, until
  one is left. ``equal_size=True`` seeds partitions with ``k`` items each (sorted, so
  neighbours in size), which keeps every part's item count equal: the per-rank sample counts
  stay what the trainer's fixed split gives today.
- :func:`exchange` (distributed): every rank all-gathers the minibatch's sample costs (small
  object collective), computes the same partition (deterministic), maps parts to ranks so that
  as many samples as possible stay where they are, and then sends each sample once, with
  everything it carries (routes, rollout/old log-probs, advantages: the whole :class:`Sample`),
  by one ``scatter_object_list`` per source rank. Torch runs object collectives on the group's
  device itself (the current CUDA device for NCCL, CPU for gloo).

Cost of a sample: ``L + quadratic_coef * L**2`` (``quadratic_coef > 0`` accounts for
attention's quadratic FLOPs, e.g. ``1 / (6 * hidden_size)`` for a rough per-token ratio of
attention to dense FLOPs).

A sample's gradient contribution does not depend on the rank it lands on (step weights are
step-global, :func:`sapo_megatron.step.run.assign_step_weights`), so balancing leaves a step's
gradient unchanged up to float summation order (tests/test_dist_budget.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist


def sample_cost(length: int, quadratic_coef: float = 0.0) -> float:
    return length + quadratic_coef * length * length


@dataclass(order=True)
class _Partial:
    """A partial partition: ``k`` (sum, items) parts, heaviest first; ordered for the heap."""

    key: tuple
    parts: list

    @classmethod
    def make(cls, parts: list, seq: int) -> "_Partial":
        parts = sorted(parts, key=lambda p: (-p[0], p[1]))
        spread = parts[0][0] - parts[-1][0]
        # Largest spread first; ties broken by creation order, so the result is deterministic.
        return cls((-spread, seq), parts)


def karmarkar_karp(costs: Sequence[float], k: int, *, equal_size: bool = False) -> list[list[int]]:
    """Partition item indices into ``k`` parts of near-equal total cost.

    ``equal_size``: every part gets ``len(costs) // k`` items, or one more (the remainder is
    spread one per part).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(costs)
    order = sorted(range(n), key=lambda i: (-costs[i], i))
    heap: list[_Partial] = []
    seq = 0
    if equal_size:
        # Groups of k neighbours in size; a short last group is filled with empty parts.
        for start in range(0, n, k):
            chunk = order[start : start + k]
            parts = [(costs[i], [i]) for i in chunk] + [(0.0, []) for _ in range(k - len(chunk))]
            heap.append(_Partial.make(parts, seq))
            seq += 1
    else:
        for i in order:
            heap.append(_Partial.make([(costs[i], [i])] + [(0.0, []) for _ in range(k - 1)], seq))
            seq += 1
    if not heap:
        return [[] for _ in range(k)]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a.parts, reversed(b.parts))]
        heapq.heappush(heap, _Partial.make(merged, seq))
        seq += 1
    return [sorted(items) for _, items in heap[0].parts]


def assign_parts_to_ranks(parts: list[list[int]], owner: Sequence[int]) -> list[list[int]]:
    """Reorder ``parts`` so that part ``r`` goes to rank ``r`` keeping most samples in place.

    ``owner[i]`` is the rank holding item ``i`` now. Greedy on the (part, rank) overlap,
    largest first; ties by index (deterministic on every rank).
    """
    k = len(parts)
    overlap = sorted(
        ((sum(owner[i] == r for i in part), -p, -r) for p, part in enumerate(parts) for r in range(k)),
        reverse=True,
    )
    out: list[list[int] | None] = [None] * k
    used = set()
    for _, neg_p, neg_r in overlap:
        p, r = -neg_p, -neg_r
        if p in used or out[r] is not None:
            continue
        out[r], used = parts[p], used | {p}
    return out  # type: ignore[return-value]


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-rank loads (1.0 = perfectly balanced; 1.0 when all are zero)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


@dataclass
class Exchange:
    """What :func:`exchange` did, for metrics and tests."""

    samples: list  # this rank's samples after the exchange, in global (source rank, index) order
    lengths_by_rank: list[list[int]]  # every rank's sample lengths after the exchange
    moved: int  # samples that changed rank, all ranks together


def exchange(samples: list, *, group=None, quadratic_coef: float = 0.0, check=None) -> Exchange:
    """Repartition one minibatch's samples over the ranks of ``group`` (a collective).

    ``samples`` are this rank's :class:`~sapo_megatron.step.batch.Sample` s. ``check``, if
    given, is called on every rank with every rank's lengths (``[rank][index]``) before anything
    moves, so a bad sample raises the same error on all ranks instead of hanging the others.
    Without torch.distributed, or in a group of one, nothing moves.
    """
    lengths = [int(s.tokens.numel()) for s in samples]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if check is not None:
            check([lengths])
        return Exchange(list(samples), [lengths], 0)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, lengths, group=group)
    if check is not None:
        check(gathered)
    items = [(r, i) for r in range(size) for i in range(len(gathered[r]))]
    costs = [sample_cost(gathered[r][i], quadratic_coef) for r, i in items]
    parts = karmarkar_karp(costs, size, equal_size=True)
    parts = assign_parts_to_ranks(parts, [r for r, _ in items])
    dest = {items[j]: r for r, part in enumerate(parts) for j in part}
    moved = sum(dest[it] != it[0] for it in items)
    received: dict[tuple[int, int], object] = {}
    for i, s in enumerate(samples):
        if dest[me, i] == me:
            received[me, i] = s
    for src in range(size):
        if not any(dest[src, i] != src for i in range(len(gathered[src]))):
            continue  # this source keeps everything: no call (every rank knows it)
        outgoing = None
        if src == me:
            outgoing = [[(i, s) for i, s in enumerate(samples) if dest[me, i] == r] for r in range(size)]
            outgoing[me] = []  # already kept
        box: list = [None]
        dist.scatter_object_list(box, outgoing, src=dist.get_global_rank(group, src), group=group)
        for i, s in box[0]:
            received[src, i] = s
    mine = [received[items[j]] for j in parts[me]]
    return Exchange(mine, [[gathered[r][i] for r, i in (items[j] for j in part)] for part in parts], moved)


def gather_lengths(samples: list, *, group=None) -> list[list[int]]:
    """Every rank's sample lengths ``[rank][index]`` (an object all-gather; local without dist)."""
    lengths = [int(s.tokens.numel()) for s in samples]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [lengths]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, lengths, group=group)
    return gathered
