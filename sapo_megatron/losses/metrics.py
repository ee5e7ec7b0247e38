"""Diagnostics of one policy-loss call: detached 0-dim tensors, means over the local valid tokens.

Design choices:
- Means are over valid (masked-in) tokens of this call, and ``num_tokens`` / ``num_sequences``
  are reported alongside, so a distributed step can combine ranks and microbatches as
  token-weighted means (sum(metric * num_tokens) / sum(num_tokens)). With no valid token every
  metric is 0 (never NaN); aggregators should skip such calls (num_tokens == 0), in particular
  for ``ratio_min`` / ``ratio_max``.
- ``loss`` and ``pg_loss`` are the reduced values (the same weights as the loss), so
  loss = pg_loss + kl_coef * (reduced KL) - entropy_coef * (reduced entropy).
- ``approx_kl`` estimates KL(old || new) with Schulman's k3 on samples from the old policy:
  mean over valid tokens of (r - 1) - log r, r = exp(clamped logp - old_logp). It is >= 0
  and, unlike the k1 mean, does not go negative by noise.
- ``gate_mean_pos`` / ``gate_mean_neg``: mean effective weight w (loss = -w A) over tokens with
  A > 0 / A < 0: SAPO's gate f(r), or the ratio a clip loss actually used (clipped or not).
- ``low_weight_frac``: SAPO: fraction of valid tokens whose gradient weight
  sech^2(tau/2 (r - 1)) < 0.5; clip losses: fraction whose gradient a clip zeroed (same as
  ``clip_frac``, plus dual-clipped tokens for dual_clip).
- ``kl`` is reported whenever ``ref_log_probs`` is given (even with kl_coef = 0), ``entropy``
  whenever entropy is given, ``train_rollout_logprob_abs_diff`` whenever rollout log-probs are
  given, ``tis_weight_mean`` / ``tis_clip_frac`` only when TIS is active.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .policy import PolicyLossTerms


def masked_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of values at mask_BT == True; 0 when the mask is empty (no NaN)."""
    mask_BT = mask_BT.bool()
    total = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).sum()
    count = mask_BT.sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _masked_extreme(values_BT: Tensor, mask_BT: Tensor, largest: bool) -> Tensor:
    fill = values_BT.new_tensor(-torch.inf if largest else torch.inf)
    filled = torch.where(mask_BT, values_BT, fill)
    extreme = filled.max() if largest else filled.min()
    return torch.where(mask_BT.any(), extreme, torch.zeros_like(extreme))


@torch.no_grad()
def policy_loss_metrics(
    *,
    loss: Tensor,
    pg_loss: Tensor,
    terms: PolicyLossTerms,
    log_probs_BT: Tensor,
    old_log_probs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    log_ratio_clamp: float,
    kl_BT: Tensor | None = None,
    entropy_BT: Tensor | None = None,
    rollout_log_probs_BT: Tensor | None = None,
    tis_weight_BT: Tensor | None = None,
    tis_capped_BT: Tensor | None = None,
) -> dict[str, Tensor]:
    dtype = loss.dtype
    f = lambda x: x.detach().to(dtype)  # noqa: E731
    mask = mask_BT.bool()
    log_ratio_BT = (log_probs_BT - old_log_probs_BT).clamp(-log_ratio_clamp, log_ratio_clamp)
    metrics = {
        "loss": f(loss),
        "pg_loss": f(pg_loss),
        "num_tokens": f(mask.sum()),
        "num_sequences": f(mask.any(dim=-1).sum()),
        "gate_mean_pos": f(masked_mean(terms.weight_BT, mask & (advantages_BT > 0))),
        "gate_mean_neg": f(masked_mean(terms.weight_BT, mask & (advantages_BT < 0))),
        "low_weight_frac": f(masked_mean(terms.low_weight_BT.to(dtype), mask)),
        "ratio_min": f(_masked_extreme(terms.ratio_BT, mask, largest=False)),
        "ratio_mean": f(masked_mean(terms.ratio_BT, mask)),
        "ratio_max": f(_masked_extreme(terms.ratio_BT, mask, largest=True)),
        "approx_kl": f(masked_mean(torch.expm1(log_ratio_BT) - log_ratio_BT, mask)),
    }
    for name, indicator_BT in terms.indicators_BT.items():
        metrics[name] = f(masked_mean(indicator_BT.to(dtype), mask))
    if kl_BT is not None:
        metrics["kl"] = f(masked_mean(kl_BT, mask))
    if entropy_BT is not None:
        metrics["entropy"] = f(masked_mean(entropy_BT, mask))
    if rollout_log_probs_BT is not None:
        metrics["train_rollout_logprob_abs_diff"] = f(masked_mean((old_log_probs_BT - rollout_log_probs_BT).abs(), mask))
    if tis_weight_BT is not None and tis_capped_BT is not None:
        metrics["tis_weight_mean"] = f(masked_mean(tis_weight_BT, mask))
        metrics["tis_clip_frac"] = f(masked_mean(tis_capped_BT.to(dtype), mask))
    return metrics
