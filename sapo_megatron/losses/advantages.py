"""Group-relative advantages (GRPO, RLOO) and their broadcast over response tokens.

Design choices:
- Groups are given either as consecutive blocks of ``group_size`` (the usual rollout layout:
  n samples per prompt, contiguous) or as explicit ``group_ids`` (any order, uneven sizes, e.g.
  after filtering). Both are turned into one group index and handled by the same scatter code,
  so there is one implementation to test.
- GRPO normalisation uses the unbiased (Bessel-corrected) standard deviation, as
  ``torch.std`` / verl / TRL do; a group of one has std 0 and advantage 0 (no baseline
  information), never NaN. ``eps`` sits in the denominator: (r - mean) / (std + eps).
- RLOO: r_i minus the mean of the *other* members; a group of one has no "others" and is an
  error naming the group.
- Rewards with NaN/inf are rejected: one bad reward would poison its whole group's mean.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import require_2d, require_finite, require_tensor, shape_str


def grpo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages ``[N]``: (r - group mean) / (group std + eps), or r - group mean."""
    rewards_N = _check_rewards(rewards)
    index_N, num_groups = _group_index(rewards_N, group_size, group_ids)
    counts_G = torch.bincount(index_N, minlength=num_groups).to(rewards_N.dtype)
    mean_G = _group_sum(rewards_N, index_N, num_groups) / counts_G
    centered_N = rewards_N - mean_G[index_N]
    if not normalize_std:
        return centered_N
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    sq_sum_G = _group_sum(centered_N.square(), index_N, num_groups)
    var_G = torch.where(counts_G > 1, sq_sum_G / (counts_G - 1).clamp_min(1), torch.zeros_like(sq_sum_G))
    denominator_N = var_G.sqrt()[index_N] + eps
    return torch.where(denominator_N > 0, centered_N / torch.where(denominator_N > 0, denominator_N, 1.0),
                       torch.zeros_like(centered_N))


def rloo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None) -> Tensor:
    """RLOO advantages ``[N]``: r_i - mean of the other members of i's group."""
    rewards_N = _check_rewards(rewards)
    index_N, num_groups = _group_index(rewards_N, group_size, group_ids)
    counts_G = torch.bincount(index_N, minlength=num_groups)
    if num_groups == 0:
        return rewards_N.clone()
    smallest = int(counts_G.min())
    if smallest < 2:
        group = int(torch.nonzero(counts_G < 2)[0])
        label = f"group {group}" if group_ids is None else f"group id {_unique_ids(group_ids)[group]}"
        raise ValueError(f"rloo_advantages needs at least 2 samples per group; {label} has {smallest}")
    sum_G = _group_sum(rewards_N, index_N, num_groups)
    others_mean_N = (sum_G[index_N] - rewards_N) / (counts_G[index_N] - 1).to(rewards_N.dtype)
    return rewards_N - others_mean_N


def broadcast_advantages(adv_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token advantages ``[B, T]``: each row's advantage on its valid tokens, 0 elsewhere."""
    require_tensor("adv_B", adv_B)
    require_2d("mask_BT", mask_BT)
    if adv_B.dim() != 1 or adv_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(f"adv_B has shape {shape_str(adv_B)}, expected ({mask_BT.shape[0]},) "
                         f"(one advantage per row of mask_BT {shape_str(mask_BT)})")
    return torch.where(mask_BT != 0, adv_B[:, None], torch.zeros((), dtype=adv_B.dtype, device=adv_B.device))


def _check_rewards(rewards: Tensor) -> Tensor:
    require_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {shape_str(rewards)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    require_finite({"rewards": rewards})
    return rewards


def _group_index(rewards_N: Tensor, group_size: int | None, group_ids: Tensor | None) -> tuple[Tensor, int]:
    n = rewards_N.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) or group_ids")
    if group_ids is not None:
        require_tensor("group_ids", group_ids)
        if group_ids.shape != rewards_N.shape:
            raise ValueError(f"group_ids has shape {shape_str(group_ids)}, expected {shape_str(rewards_N)} like rewards")
        if group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
        unique, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(rewards_N.device), unique.numel()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(f"rewards has {n} entries, not a multiple of group_size={group_size}")
    return torch.arange(n, device=rewards_N.device) // group_size, n // group_size


def _group_sum(values_N: Tensor, index_N: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values_N.dtype, device=values_N.device).index_add_(0, index_N, values_N)


def _unique_ids(group_ids: Tensor) -> list:
    return torch.unique(group_ids).tolist()
