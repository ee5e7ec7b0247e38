"""How the trainer cuts one RL step's samples into minibatches and microbatches, and the
``batch/`` metrics that show where the time goes.

Two ways, chosen by ``train``:

- ``micro_batch_size`` (fixed count): each DP rank keeps the samples it generated; minibatch
  ``u`` is its ``u``-th slice, cut into microbatches of that many samples (in arrival order);
- ``max_tokens_per_microbatch`` (token budget): every minibatch is balanced over the DP ranks by
  tokens and packed under the budget (:func:`sapo_megatron.step.plan.plan_minibatch`), after
  advantages are computed and before the log-prob passes, so the old/reference log-probs, R2's
  recorded routes and the updates all see the balanced samples.

Either way the step's gradient is the same (step-global weights, ``assign_step_weights``).

Collated lengths (:func:`collate_microbatch`): a packed row holds the sum of its samples'
lengths and a padded row its longest sample, rounded up to what TP/SP and CP need
(:func:`sapo_megatron.step.batch.sequence_multiples`). Where Megatron needs one shape for every
microbatch, every row of the step is padded to the step's longest row: this rank's under
pipeline parallelism (one pipeline exchanges activations of one fixed shape; other DP ranks'
pipelines are independent), over the DP group under Megatron's allgather token dispatcher with
expert parallelism (it gathers equal token counts over DP ranks); a token-budget plan gives its
own equal-shape lengths.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sapo_megatron.collectives import global_max, group_device
from sapo_megatron.step.balance import imbalance
from sapo_megatron.step.batch import collate_packed, collate_padded, packed_row_length
from sapo_megatron.step.budget import round_up
from sapo_megatron.step.plan import plan_minibatch


@dataclass
class Minibatch:
    samples: list  # this rank's samples of one optimizer step, in microbatch order
    sizes: list[int]  # samples per microbatch
    min_lengths: list[int] | None  # per microbatch, the length to pad to (None or 0: its own)

    def groups(self) -> list[list]:
        out, start = [], 0
        for n in self.sizes:
            out.append(self.samples[start : start + n])
            start += n
        return out


def row_length(lengths, layout: str, pad_multiple: int = 1, sample_multiple: int = 1) -> int:
    """The sequence length ``collate_microbatch`` gives a microbatch of samples of ``lengths``."""
    if layout == "packed":
        return packed_row_length(lengths, pad_multiple, sample_multiple=sample_multiple)
    return round_up(max(lengths), pad_multiple)


def collate_microbatch(group: list, *, layout: str, pad_multiple: int = 1, sample_multiple: int = 1,
                       min_length: int = 0, use_thd: bool = False):
    """One microbatch of ``group`` in ``layout``, at least ``min_length`` long (see the module
    docstring). ``use_thd``: packed rows get ``PackedSeqParams`` (Transformer Engine)."""
    if layout == "padded":
        return collate_padded(group, pad_multiple=pad_multiple, min_length=min_length)
    return collate_packed(group, pad_multiple=pad_multiple, sample_multiple=sample_multiple,
                          min_length=min_length, use_thd=use_thd)


class StepBatcher:
    def __init__(self, train_cfg, *, pad_multiple: int, dp_group, equal_shapes: bool = False,
                 sample_multiple: int = 1, one_shape: bool = False, one_shape_over_dp: bool = False):
        """``pad_multiple`` / ``sample_multiple``: ``step.batch.sequence_multiples``;
        ``equal_shapes``: a token-budget plan's microbatch ``i`` has one shape on every DP rank;
        ``one_shape``: fixed-count microbatches all take this rank's longest row of the step,
        ``one_shape_over_dp``: the longest over the DP group (module docstring)."""
        self.cfg = train_cfg
        self.pad_multiple = pad_multiple
        self.sample_multiple = sample_multiple
        self.dp_group = dp_group
        self.equal_shapes = equal_shapes
        self.one_shape = one_shape or one_shape_over_dp
        self.one_shape_over_dp = one_shape_over_dp
        self.moved = 0

    def with_updates(self, updates: int) -> "StepBatcher":
        """This batcher for a step of ``updates`` minibatches (the cold start runs one)."""
        other = copy.copy(self)
        other.cfg = dataclasses.replace(self.cfg, updates_per_rollout=updates)
        return other

    def row_length(self, group: list) -> int:
        return row_length([s.tokens.numel() for s in group], self.cfg.layout, self.pad_multiple, self.sample_multiple)

    def split(self, samples: list, *, label: str = "") -> list[Minibatch]:
        updates = self.cfg.updates_per_rollout
        per = len(samples) // updates
        slices = [samples[u * per : (u + 1) * per] for u in range(updates)]
        size = self.cfg.micro_batch_size
        if self.cfg.max_tokens_per_microbatch is None:
            out = [Minibatch(s, [len(s[i : i + size]) for i in range(0, len(s), size)], None) for s in slices]
            if self.one_shape:
                longest = max(self.row_length(g) for m in out for g in m.groups())
                if self.one_shape_over_dp:
                    longest = int(global_max(longest, group=self.dp_group))
                out = [dataclasses.replace(m, min_lengths=[longest] * len(m.sizes)) for m in out]
            return out
        out, self.moved = [], 0
        for u, mine in enumerate(slices):
            plan = plan_minibatch(
                mine, budget=self.cfg.max_tokens_per_microbatch, layout=self.cfg.layout,
                pad_multiple=self.pad_multiple, sample_multiple=self.sample_multiple,
                quadratic_coef=self.cfg.balance_quadratic_coef,
                group=self.dp_group, equal_shapes=self.equal_shapes, label=f"{label}, minibatch {u}",
            )
            self.moved += plan.moved
            out.append(Minibatch(plan.samples, [len(g) for g in plan.groups], plan.min_lengths))
        return out


def batch_metrics(*, real_tokens: int, collated_tokens: int, response_tokens: int, microbatches: int,
                  rollout_s: float, train_s: float, dp_group) -> dict[str, float]:
    """``batch/`` metrics of one step from this rank's counts (one all-gather over DP).

    ``real_tokens`` / ``collated_tokens``: sample tokens and collated (padded) tokens of this
    rank's update microbatches; ``response_tokens``: tokens this rank's rollout generated;
    ``microbatches``: this rank's update microbatches, all updates of the step (the plan's count
    under a token budget, which varies from step to step).
    """
    local = torch.tensor([real_tokens, collated_tokens, response_tokens, microbatches], dtype=torch.float64,
                         device=group_device(dp_group))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(dp_group))]
    dist.all_gather(parts, local, group=dp_group)
    table = torch.stack(parts).cpu()
    real, collated, response, _ = table.sum(0).tolist()
    return {
        "batch/train_tokens_per_s": real / train_s if train_s > 0 else 0.0,
        "batch/gen_tokens_per_s": response / rollout_s if rollout_s > 0 else 0.0,
        "batch/padding_frac": 1.0 - real / collated if collated > 0 else 0.0,
        "batch/dp_imbalance": imbalance(table[:, 0].tolist()),
        # The most of any DP rank (a token budget gives every rank the same count).
        "batch/microbatches": float(table[:, 3].max()),
    }
