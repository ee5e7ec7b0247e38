"""One minibatch under a token budget: balance its samples over DP ranks, then pack them.

This is what ``train.max_tokens_per_microbatch`` does to every minibatch (= optimizer step) of
an RL step, after advantages are computed and before the log-prob passes:

1. every DP rank's sample lengths are checked against the budget (on every rank, so a bad
   sample fails the whole group with one clear error);
2. :func:`sapo_megatron.step.balance.exchange` moves samples between DP ranks so that each holds
   about the same tokens (Karmarkar-Karp, equal sample counts);
3. each rank packs its samples under the budget (:mod:`sapo_megatron.step.budget`) into the
   SAME number of microbatches as every other rank of its DP group: the largest count any rank
   needs. Why equal counts: under expert parallelism every microbatch's forward runs an
   all-to-all over ranks of different DP replicas, so DP ranks must run the same number of
   forwards; Megatron's schedule itself needs one count per pipeline (all stages of a pipeline
   hold the same samples, so that holds by construction). A rank that needs fewer microbatches
   splits its costliest ones (never an empty microbatch, which would still route pad tokens
   through the experts).

Every rank of a DP group computes the same packing of every rank's lengths, so agreeing on the
count costs no collective. Under pipeline parallelism microbatch shapes now differ, which
Megatron supports with ``variable_seq_lengths`` (:func:`enable_variable_seq_lengths`).

The gradient of the step is unchanged: step weights are step-global
(:func:`sapo_megatron.step.run.assign_step_weights`), so neither the rank nor the microbatch a
sample lands in changes its contribution (tests/test_dist_budget.py checks it at DP, TP+SP, PP).
"""

from __future__ import annotations

from dataclasses import dataclass

from sapo_megatron.step.balance import exchange, imbalance
from sapo_megatron.step.budget import check_fits, microbatch_cost, pack, pack_exact


@dataclass
class MinibatchPlan:
    groups: list[list]  # this rank's samples, one list per microbatch
    # Per microbatch, the length to pad its collated row to (0: its own), for equal shapes.
    min_lengths: list[int]
    tokens_by_rank: list[int]  # real tokens on each DP rank after balancing
    moved: int  # samples that changed DP rank

    @property
    def samples(self) -> list:
        return [s for g in self.groups for s in g]

    @property
    def dp_imbalance(self) -> float:
        return imbalance(self.tokens_by_rank)


def plan_minibatch(samples: list, *, budget: int, layout: str, pad_multiple: int = 1, sample_multiple: int = 1,
                   quadratic_coef: float = 0.0, group=None, balance: bool = True, equal_shapes: bool = False,
                   label: str = "") -> MinibatchPlan:
    """This rank's microbatches for one minibatch (a collective over the DP ``group``).

    ``equal_shapes``: microbatch ``i`` gets the same shape on every DP rank (packed layout
    only), padded to the largest; see :func:`needs_equal_shapes`. ``pad_multiple`` /
    ``sample_multiple``: :func:`sapo_megatron.step.batch.sequence_multiples`.
    """
    if equal_shapes and layout != "packed":
        raise ValueError("train.max_tokens_per_microbatch under expert parallelism with Megatron's allgather "
                         "token dispatcher (the CPU default) needs equal microbatch shapes on every rank: "
                         "set train.layout=packed (or use the alltoall dispatcher)")

    def check(lengths_by_rank: list[list[int]]) -> None:
        for r, lengths in enumerate(lengths_by_rank):
            names = [f"sample {i} of data-parallel rank {r}{label}" for i in range(len(lengths))]
            check_fits(lengths, budget, pad_multiple=pad_multiple, names=names)

    if balance:
        moved = exchange(samples, group=group, quadratic_coef=quadratic_coef, check=check)
        mine, lengths_by_rank, n_moved = moved.samples, moved.lengths_by_rank, moved.moved
    else:
        from sapo_megatron.step.balance import gather_lengths

        lengths_by_rank = gather_lengths(samples, group=group)
        check(lengths_by_rank)
        mine, n_moved = list(samples), 0
    needed = [len(pack(lengths, budget, layout=layout, pad_multiple=pad_multiple, sample_multiple=sample_multiple))
              if lengths else 0
              for lengths in lengths_by_rank]
    count = max(needed)
    fewest = min(len(lengths) for lengths in lengths_by_rank)
    if fewest < count:
        raise ValueError(
            f"data-parallel ranks must run the same number of microbatches{label}: one rank needs "
            f"{count} under train.max_tokens_per_microbatch={budget}, but another holds only {fewest} "
            f"samples; raise the budget or use more samples per minibatch")
    def bins_of(lengths: list[int]) -> list[list[int]]:
        bins = pack_exact(lengths, count, budget, layout=layout, pad_multiple=pad_multiple,
                          sample_multiple=sample_multiple)
        # Costliest first on every rank, so that equal-shape padding pairs like with like.
        return sorted(bins, key=lambda b: (-cost([lengths[i] for i in b]), min(b)))

    def cost(lengths: list[int]) -> int:
        return microbatch_cost(lengths, layout, pad_multiple, sample_multiple)

    lengths = [int(s.tokens.numel()) for s in mine]
    bins = bins_of(lengths)
    min_lengths = [0] * count
    if equal_shapes:
        costs = []
        for rank_lengths in lengths_by_rank:
            costs.append([cost([rank_lengths[i] for i in b]) for b in bins_of(rank_lengths)])
        min_lengths = [max(c[i] for c in costs) for i in range(count)]
    groups = [[mine[i] for i in b] for b in bins]
    return MinibatchPlan(groups, min_lengths, [sum(ls) for ls in lengths_by_rank], n_moved)


def needs_equal_shapes(model_chunks) -> bool:
    """True when every DP rank's microbatch ``i`` must have one shape: Megatron's ``allgather``
    token dispatcher all-gathers hidden states over the expert-parallel group (ranks of
    different DP replicas), which needs equal token counts; ``alltoall`` does not."""
    from megatron.core import parallel_state

    from sapo_megatron.step.sharding import unwrap

    config = unwrap(model_chunks[0]).config
    return (parallel_state.get_expert_model_parallel_world_size() > 1
            and getattr(config, "moe_token_dispatcher_type", None) == "allgather")


def padded_tokens(groups: list[list[int]], layout: str, pad_multiple: int = 1) -> int:
    """Tokens the collated microbatches occupy (real + padding), for the padding metric."""
    return sum(microbatch_cost(g, layout, pad_multiple) for g in groups)


def enable_variable_seq_lengths(model_chunks) -> None:
    """Let Megatron's pipeline p2p exchange each microbatch's shape (they differ under a budget)."""
    from sapo_megatron.step.sharding import unwrap

    for chunk in model_chunks:
        unwrap(chunk).config.variable_seq_lengths = True
        config = getattr(chunk, "config", None)
        if config is not None:
            config.variable_seq_lengths = True
