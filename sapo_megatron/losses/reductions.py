"""How per-token losses become one scalar: per-token weights, loss = sum(values * weights).

Design choices:
- Every reduction is expressed as a weight tensor ``[B, T]`` rather than as a mean. A weighted
  sum is linear, so a step's loss is the sum of its microbatches' losses *provided the weights
  use step-global counts*. The distributed step computes the counts once (all-reduced over DP,
  summed over microbatches) and passes them here; this removes the dependence of the gradient
  on the microbatch / data-parallel split, which the peers' per-microbatch means all had.
- Counts default to the local batch, so single-process use needs no arguments.
- Zero denominators give zero weight (an all-masked row contributes nothing; no NaN).
- Arguments a reduction does not use are accepted and ignored, so a caller can compute all
  global counts once and pass them regardless of the configured reduction.
- Registry ``REDUCTIONS``: name -> weight function.

Reductions (N = num_sequences, L_i = valid tokens of sequence i):
  token_mean               mask / total_tokens
  seq_mean_token_mean      mask / (L_i * N)            (SAPO paper default)
  seq_mean_token_sum       mask / N
  seq_mean_token_sum_norm  mask / (N * norm_length)    (Dr.GRPO; norm_length defaults to T)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .checks import require_2d, require_tensor, shape_str


@dataclass
class ReductionCounts:
    """Denominators as tensors on the mask's device and dtype (global or local)."""

    num_sequences: Tensor  # 0-dim
    seq_token_counts_B: Tensor  # [B]
    total_tokens: Tensor  # 0-dim
    norm_length: Tensor  # 0-dim


ReductionFn = Callable[[Tensor, ReductionCounts], Tensor]
REDUCTIONS: dict[str, ReductionFn] = {}


def register_reduction(name: str) -> Callable[[ReductionFn], ReductionFn]:
    def decorator(fn: ReductionFn) -> ReductionFn:
        if name in REDUCTIONS:
            raise ValueError(f"reduction {name!r} is already registered")
        REDUCTIONS[name] = fn
        return fn

    return decorator


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where denominator <= 0 (no NaN, no inf, no NaN grad)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


@register_reduction("token_mean")
def _token_mean(mask_BT: Tensor, counts: ReductionCounts) -> Tensor:
    return safe_divide(mask_BT, counts.total_tokens.expand_as(mask_BT))


@register_reduction("seq_mean_token_mean")
def _seq_mean_token_mean(mask_BT: Tensor, counts: ReductionCounts) -> Tensor:
    denominator_B = counts.seq_token_counts_B * counts.num_sequences
    return safe_divide(mask_BT, denominator_B[:, None].expand_as(mask_BT))


@register_reduction("seq_mean_token_sum")
def _seq_mean_token_sum(mask_BT: Tensor, counts: ReductionCounts) -> Tensor:
    return safe_divide(mask_BT, counts.num_sequences.expand_as(mask_BT))


@register_reduction("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(mask_BT: Tensor, counts: ReductionCounts) -> Tensor:
    return safe_divide(mask_BT, (counts.num_sequences * counts.norm_length).expand_as(mask_BT))


def reduction_weights(
    mask_BT: Tensor,
    reduction: str,
    *,
    num_sequences: int | float | Tensor | None = None,
    seq_token_counts_B: Tensor | None = None,
    total_tokens: int | float | Tensor | None = None,
    norm_length: int | float | Tensor | None = None,
) -> Tensor:
    """Per-token weights ``[B, T]`` such that the reduced loss is ``sum(values_BT * weights)``.

    Defaults are local: ``num_sequences`` = rows with at least one valid token,
    ``seq_token_counts_B`` = row sums of the mask, ``total_tokens`` = mask sum,
    ``norm_length`` = T. Pass step-global values to make the loss split-invariant.
    The result has the mask's dtype if it is floating, else the default dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {sorted(REDUCTIONS)}")
    require_2d("mask_BT", mask_BT)
    dtype = mask_BT.dtype if mask_BT.is_floating_point() else torch.get_default_dtype()
    mask_f = (mask_BT != 0).to(dtype)
    batch, tokens = mask_f.shape
    local_counts_B = mask_f.sum(dim=-1)

    if seq_token_counts_B is None:
        seq_counts_B = local_counts_B
    else:
        require_tensor("seq_token_counts_B", seq_token_counts_B)
        if seq_token_counts_B.shape != (batch,):
            raise ValueError(f"seq_token_counts_B has shape {shape_str(seq_token_counts_B)}, "
                             f"expected ({batch},) (one count per row of mask_BT)")
        seq_counts_B = seq_token_counts_B.to(device=mask_f.device, dtype=dtype)

    counts = ReductionCounts(
        num_sequences=_count("num_sequences", num_sequences, (local_counts_B > 0).sum(), mask_f),
        seq_token_counts_B=seq_counts_B,
        total_tokens=_count("total_tokens", total_tokens, mask_f.sum(), mask_f),
        norm_length=_count("norm_length", norm_length, tokens, mask_f, strictly_positive=True),
    )
    return REDUCTIONS[reduction](mask_f, counts)


def _count(name: str, value: int | float | Tensor | None, default: int | Tensor, like: Tensor,
           strictly_positive: bool = False) -> Tensor:
    if value is None:
        value = default
    elif isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {shape_str(value)}")
        value = value.reshape(())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    elif not (value > 0 if strictly_positive else value >= 0):
        raise ValueError(f"{name} must be {'> 0' if strictly_positive else '>= 0'}, got {value!r}")
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)
