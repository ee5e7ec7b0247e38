"""Dynamic sampling: drop prompt groups the loss cannot learn from, over-sample to refill.

With group-relative advantages (GRPO, RLOO), a group whose completed samples all got the same
reward has every advantage 0: it adds no policy gradient and only dilutes the batch (DAPO's
"dynamic sampling"). ``rollout.dynamic_sampling.filter: zero_variance`` drops such groups and
generates more prompts, round after round, until each data-parallel rank holds its quota of
groups or ``max_rounds`` rounds have run.

Pure logic here (no torch.distributed): :data:`GROUP_FILTERS` (a registry: name -> which groups
to keep) and :class:`GroupCollector`, which accumulates kept groups over rounds. The trainer
(``trainer/loop.py``) runs the rounds: every rank draws the same global prompts each round (the
prompt stream stays identical on all ranks), a rank whose quota is full skips generation, and
the loop stops when all ranks are full (one all-reduce per round).

If the batch cannot be filled within ``max_rounds``, the step is never empty nor short: the
shortfall is topped up with the dropped groups of the earliest rounds (their advantages are 0,
exactly what training without the filter would have used), and a warning gives the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# name -> keep(rewards_G, completed_G) -> bool: whether a group is worth training on.
GROUP_FILTERS: dict[str, Callable[[torch.Tensor, torch.Tensor], bool]] = {}


def register_group_filter(name: str):
    def add(fn):
        GROUP_FILTERS[name] = fn
        return fn

    return add


@register_group_filter("zero_variance")
def _zero_variance(rewards: torch.Tensor, completed: torch.Tensor) -> bool:
    """Keep a group unless all its completed samples share one reward (or none completed)."""
    done = rewards[completed]
    return done.numel() >= 2 and bool((done != done[0]).any())


def keep_groups(name: str, rewards: torch.Tensor, completed: torch.Tensor, group_size: int) -> list[bool]:
    """Per group (consecutive ``group_size`` samples), whether filter ``name`` keeps it."""
    if name not in GROUP_FILTERS:
        raise ValueError(f"rollout.dynamic_sampling.filter must be one of {sorted(GROUP_FILTERS)}, got {name!r}")
    fn = GROUP_FILTERS[name]
    r, c = rewards.view(-1, group_size), completed.view(-1, group_size)
    return [fn(r[g], c[g]) for g in range(r.shape[0])]


@dataclass
class GroupCollector:
    """Kept groups of one rank over rounds, up to ``quota``; dropped ones saved for a top-up.

    A group is whatever the caller stores (here: the prompts, results and rewards of one prompt's
    ``samples_per_prompt`` samples).
    """

    quota: int
    kept: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    generated: int = 0  # groups generated, all rounds

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.quota

    def add(self, groups: list, keep: list[bool]) -> None:
        self.generated += len(groups)
        for group, k in zip(groups, keep):
            (self.kept if k else self.dropped).append(group)

    def take(self) -> tuple[list, int]:
        """``quota`` groups: the first kept ones, topped up with dropped ones; and the top-up count."""
        out = self.kept[: self.quota]
        missing = self.quota - len(out)
        return out + self.dropped[:missing], missing

    @property
    def filtered(self) -> int:
        return self.generated - len(self.kept)
