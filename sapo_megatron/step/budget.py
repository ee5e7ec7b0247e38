"""Token-budget microbatches: pack one DP rank's samples into microbatches under a budget.

Pure functions on sample lengths (no torch.distributed, no tensors), used by
:mod:`sapo_megatron.step.plan`. Why a budget instead of ``micro_batch_size``: RL response
lengths are long-tailed, so a fixed sample count must be sized for the worst case and wastes
memory and compute on every shorter microbatch. A token budget bounds what one forward holds.

What a microbatch costs depends on the layout (:mod:`sapo_megatron.step.batch`):

- ``packed`` (THD): :func:`~sapo_megatron.step.batch.packed_row_length`, the sum of lengths
  (each rounded up to ``sample_multiple`` under context parallelism) rounded up to ``pad_multiple``;
- ``padded``: ``count * round_up(longest, pad_multiple)`` tokens (padding is computed too).

Packing is first-fit-decreasing for ``packed`` (within 11/9 OPT + 6/9 bins) and, for
``padded``, the cheapest cut of the length-sorted order (samples of similar length share a
microbatch), where a cut costs its padded tokens plus a fixed overhead per microbatch
(:data:`MICROBATCH_OVERHEAD`): fewest microbatches alone would leave much padding. :func:`pack_exact` then reaches an exact
microbatch count, the one every rank of a data-parallel group must run (see
:mod:`sapo_megatron.step.plan`), by splitting the costliest microbatches: a split never breaks
the budget and never produces an empty microbatch.

Usage::

    from sapo_megatron.step.budget import pack, pack_exact
    bins = pack([900, 40, 2000, 300], budget=2048, layout="packed")   # [[2], [0, 3, 1]]
    bins = pack_exact([900, 40, 2000, 300], 3, budget=2048, layout="packed")
"""

from __future__ import annotations

from typing import Callable, Sequence

from sapo_megatron.step.batch import packed_row_length, round_up

LAYOUTS = ("padded", "packed")


def microbatch_cost(lengths: Sequence[int], layout: str, pad_multiple: int = 1, sample_multiple: int = 1) -> int:
    """Tokens one microbatch of samples with these lengths occupies in ``layout``."""
    if not lengths:
        return 0
    if layout == "packed":
        return packed_row_length(lengths, pad_multiple, sample_multiple=sample_multiple)
    if layout == "padded":
        return len(lengths) * round_up(max(lengths), pad_multiple)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_fits(lengths: Sequence[int], budget: int, *, pad_multiple: int = 1,
               names: Sequence[str] | None = None, key: str = "train.max_tokens_per_microbatch") -> None:
    """Refuse a sample that cannot fit any microbatch: one line naming it and both numbers."""
    for i, n in enumerate(lengths):
        size = round_up(n, pad_multiple)
        if size > budget:
            name = names[i] if names is not None else f"sample {i}"
            rounded = f" ({n} rounded up to a multiple of {pad_multiple})" if size != n else ""
            raise ValueError(f"{name} has {size} tokens{rounded}, more than {key}={budget}: raise the "
                             f"budget or lower rollout.max_new_tokens / the prompt length")


def _first_fit_decreasing(lengths, budget, cost) -> list[list[int]]:
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in bins:
            if cost([lengths[j] for j in b] + [lengths[i]]) <= budget:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


# What one more microbatch costs, in tokens of padding, as a fraction of the budget: the padded
# packer trades padding against microbatch count (kernel launches, per-microbatch optimizer
# bookkeeping, smaller matmuls). At 1/16, lognormal RL lengths pack with <10% padding.
MICROBATCH_OVERHEAD = 1 / 16


def _sorted_cut(lengths, budget, cost) -> list[list[int]]:
    """Cut the length-sorted order into microbatches minimising padded tokens + overhead x count.

    A dynamic programme over cut points of the sorted order (``best[j]``: the cheapest cut of
    the ``j`` longest samples). For the padded cost (count x longest) an optimal partition is
    contiguous in sorted order, so this is optimal among all partitions (tests/test_budget.py
    checks it by brute force).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n, overhead = len(order), MICROBATCH_OVERHEAD * budget
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for i in range(n):  # a microbatch starting at sorted position i (its longest sample)
        for j in range(i + 1, n + 1):
            c = cost([lengths[order[i]]] * (j - i))  # count x longest: the sorted head is longest
            if c > budget:
                break
            if best[i] + c + overhead < best[j]:
                best[j], back[j] = best[i] + c + overhead, i
    bins, j = [], n
    while j > 0:
        bins.append(order[back[j] : j])
        j = back[j]
    return bins[::-1]


PACKERS: dict[str, Callable] = {"packed": _first_fit_decreasing, "padded": _sorted_cut}


def pack(lengths: Sequence[int], budget: int, *, layout: str, pad_multiple: int = 1, sample_multiple: int = 1,
         names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into microbatches under ``budget`` (see the module docstring)."""
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    if layout not in PACKERS:
        raise ValueError(f"layout must be one of {sorted(PACKERS)}, got {layout!r}")
    check_fits(lengths, budget, pad_multiple=pad_multiple, names=names)
    cost = lambda ls: microbatch_cost(ls, layout, pad_multiple, sample_multiple)  # noqa: E731
    return PACKERS[layout](list(lengths), budget, cost)


def _split(lengths, members: list[int]) -> tuple[list[int], list[int]]:
    """Two halves of one microbatch: alternate in decreasing length (similar lengths and sums)."""
    order = sorted(members, key=lambda i: (-lengths[i], i))
    return order[0::2], order[1::2]


def pack_exact(lengths: Sequence[int], count: int, budget: int, *, layout: str, pad_multiple: int = 1,
               sample_multiple: int = 1, names: Sequence[str] | None = None) -> list[list[int]]:
    """Exactly ``count`` non-empty microbatches under ``budget`` (``count`` >= what :func:`pack` needs).

    Splitting a microbatch lowers the cost of both halves (cost is monotone in the member set),
    so the budget still holds; the costliest splittable microbatch is split first, which also
    evens out the microbatches' costs.
    """
    if not 1 <= count <= len(lengths):
        raise ValueError(f"cannot make {count} non-empty microbatches from {len(lengths)} samples")
    bins = pack(lengths, budget, layout=layout, pad_multiple=pad_multiple, sample_multiple=sample_multiple,
                names=names)
    if len(bins) > count:
        raise ValueError(f"{len(lengths)} samples need {len(bins)} microbatches under the budget "
                         f"{budget}, more than the {count} asked for")
    cost = lambda b: microbatch_cost([lengths[i] for i in b], layout, pad_multiple, sample_multiple)  # noqa: E731
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        worst = max(splittable, key=cost)
        bins.remove(worst)
        bins.extend(_split(lengths, worst))
    return sorted(bins, key=lambda b: min(b))
