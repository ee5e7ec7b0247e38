"""Karmarkar-Karp partition over DP ranks (sapo_megatron.step.balance), against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from sapo_megatron.step.balance import assign_parts_to_ranks, imbalance, karmarkar_karp, sample_cost


def _best_max(costs, k, equal_size):
    """The smallest possible heaviest part over all assignments (brute force)."""
    n, best = len(costs), float("inf")
    for labels in itertools.product(range(k), repeat=n):
        sizes = [labels.count(p) for p in range(k)]
        if equal_size and max(sizes) - min(sizes) > 1:
            continue
        best = min(best, max(sum(c for c, l in zip(costs, labels) if l == p) for p in range(k)))
    return best


def _check_partition(parts, n, k, equal_size):
    assert len(parts) == k
    assert sorted(i for p in parts for i in p) == list(range(n))
    if equal_size:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("equal_size", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_kk_against_brute_force(k, equal_size):
    rng = random.Random(k * 10 + equal_size)
    ratios, optimal = [], 0
    for _ in range(40):
        n = rng.randint(k, 8)
        costs = [float(min(2048, max(16, int(rng.lognormvariate(5.5, 1.0))))) for _ in range(n)]
        parts = karmarkar_karp(costs, k, equal_size=equal_size)
        _check_partition(parts, n, k, equal_size)
        got = max(sum(costs[i] for i in p) for p in parts)
        best = _best_max(costs, k, equal_size)
        ratios.append(got / best)
        optimal += got == best
    # Differencing is a heuristic: on these long-tailed inputs it is within 4/3 of the optimum
    # (the classic LPT bound, which KK meets or beats in practice) everywhere...
    assert max(ratios) <= 4 / 3 + 1e-9, max(ratios)
    # ...and exactly optimal in most cases (a guard that the brute force is not trivially loose).
    assert optimal >= 0.6 * len(ratios), optimal


def test_kk_beats_arrival_order_on_long_tails():
    rng = random.Random(5)
    costs = [float(min(2048, max(16, int(rng.lognormvariate(5.5, 1.2))))) for _ in range(64)]
    parts = karmarkar_karp(costs, 4, equal_size=True)
    kk = imbalance([sum(costs[i] for i in p) for p in parts])
    arrival = imbalance([sum(costs[r::4]) for r in range(4)])
    assert kk < 1.01 < arrival


def test_quadratic_cost_changes_the_partition():
    lengths = [2000, 1000, 1000, 10, 10, 10, 980, 20]
    linear = karmarkar_karp([sample_cost(n) for n in lengths], 2, equal_size=True)
    quadratic = karmarkar_karp([sample_cost(n, 1e-2) for n in lengths], 2, equal_size=True)
    q = [sum(sample_cost(lengths[i], 1e-2) for i in p) for p in quadratic]
    q_of_linear = [sum(sample_cost(lengths[i], 1e-2) for i in p) for p in linear]
    assert max(q) <= max(q_of_linear)


def test_parts_stay_on_their_owner_when_possible():
    owner = [0, 0, 1, 1, 2, 2]
    parts = [[4, 5], [0, 1], [2, 3]]
    assert assign_parts_to_ranks(parts, owner) == [[0, 1], [2, 3], [4, 5]]


def test_small_inputs():
    assert karmarkar_karp([], 3) == [[], [], []]
    assert sorted(map(len, karmarkar_karp([5.0], 2))) == [0, 1]
    with pytest.raises(ValueError):
        karmarkar_karp([1.0], 0)
