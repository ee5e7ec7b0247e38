"""KL penalty estimators between the policy and a reference policy, per token.

Design choices:
- A registry (``KL_PENALTIES``) maps the config's ``kl_type`` to an estimator, so adding one is a
  decorated function, not another ``elif``.
- Samples come from the policy, so with d = ref_logp - logp:
  ``k1 = logp - ref`` (unbiased, high variance, can be negative),
  ``k2 = 0.5 * (logp - ref)^2`` (biased, low variance),
  ``k3 = exp(d) - d - 1`` (Schulman's unbiased, non-negative estimator), exactly as written,
  ``low_var_kl`` = k3 with d clamped to [-20, 20] and the result clamped to [-10, 10], as verl
  does. ``k3`` is the textbook formula without clamps: at |d| > ~88 it overflows in float32,
  which is why ``low_var_kl`` is the default of ``PolicyLossConfig``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .checks import require_same_shape, require_tensor

KlFn = Callable[[Tensor, Tensor], Tensor]
KL_PENALTIES: dict[str, KlFn] = {}

LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_VALUE_CLAMP = 10.0


def register_kl_penalty(name: str) -> Callable[[KlFn], KlFn]:
    def decorator(fn: KlFn) -> KlFn:
        if name in KL_PENALTIES:
            raise ValueError(f"KL penalty {name!r} is already registered")
        KL_PENALTIES[name] = fn
        return fn

    return decorator


@register_kl_penalty("k1")
def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    return log_probs - ref_log_probs


@register_kl_penalty("k2")
def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    return 0.5 * (log_probs - ref_log_probs).square()


@register_kl_penalty("k3")
def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1


@register_kl_penalty("low_var_kl")
def kl_low_var(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    d = (ref_log_probs - log_probs).clamp(-LOW_VAR_KL_LOG_RATIO_CLAMP, LOW_VAR_KL_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(-LOW_VAR_KL_VALUE_CLAMP, LOW_VAR_KL_VALUE_CLAMP)


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate of policy vs reference, same shape as the inputs."""
    if kl_type not in KL_PENALTIES:
        raise ValueError(f"unknown kl_type {kl_type!r}; known: {sorted(KL_PENALTIES)}")
    require_tensor("log_probs", log_probs)
    require_same_shape("ref_log_probs", ref_log_probs, "log_probs", log_probs)
    return KL_PENALTIES[kl_type](log_probs, ref_log_probs)
