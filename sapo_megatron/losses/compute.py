"""Entry point: validate inputs, per-token policy loss + KL + entropy + TIS, reduce, metrics.

Design choices:
- One function, ``compute_policy_loss``, reads top to bottom: checks, clean inputs, per-token
  loss from the registry, extras, weights, scalar, metrics. No torch.distributed here: the
  distributed step passes ``token_weights`` built by ``reduction_weights`` with step-global
  counts, and then ``reduction`` is not applied locally (it is still validated).
- Masked positions are replaced by 0 with ``torch.where`` before any arithmetic, so garbage
  (even NaN) in padding cannot reach the loss or its gradient; the final per-token loss is
  zeroed there again.
- ``old_log_probs``, ``ref_log_probs`` and ``rollout_log_probs`` are constants of the objective
  and are detached here: passing ``old_log_probs=log_probs`` by mistake (on-policy) then still
  gives the right gradient instead of a silent zero.
- Computation runs in at least float32 (bf16 log-probs are upcast): the gate and the ratio
  need the precision, and it costs little next to the model.
- TIS (truncated importance sampling, train/rollout engine mismatch): the policy-gradient term
  of each token is multiplied by the detached weight min(exp(old - rollout), tis_cap), computed
  as exp(min(old - rollout, log tis_cap)) so it cannot overflow.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import as_bool_mask, require_2d, require_finite, require_same_shape
from .config import PolicyLossConfig
from .kl import KL_PENALTIES
from .metrics import policy_loss_metrics
from .policy import POLICY_LOSSES
from .reductions import REDUCTIONS, reduction_weights


def compute_policy_loss(
    loss_type: str,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PolicyLossConfig | None = None,
    reduction: str = "seq_mean_token_mean",
    ref_log_probs: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar policy loss and detached metrics. All tensor inputs are ``[batch, tokens]``.

    Without ``token_weights`` the loss is ``sum(per_token_loss * reduction_weights(mask,
    reduction))``; with them it is ``sum(per_token_loss * token_weights)``.
    """
    config = PolicyLossConfig() if config is None else config
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    config.validate()
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(POLICY_LOSSES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {sorted(REDUCTIONS)}")

    require_2d("log_probs", log_probs)
    optional = {"ref_log_probs": ref_log_probs, "entropy": entropy, "rollout_log_probs": rollout_log_probs,
                "token_weights": token_weights}
    given = {"old_log_probs": old_log_probs, "advantages": advantages, "mask": mask}
    given.update({name: x for name, x in optional.items() if x is not None})
    for name, x in given.items():
        require_same_shape(name, x, "log_probs", log_probs)
    mask_BT, mask_is_binary = as_bool_mask(mask)
    data = {name: x for name, x in given.items() if name not in ("mask", "entropy")}
    extra_flags = {} if mask_is_binary is None else {"mask": (mask_is_binary, "must hold only 0/1 (or bool) values")}
    require_finite(data, mask_BT, extra_flags)

    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)

    def clean(x: Tensor) -> Tensor:
        return torch.where(mask_BT, x.to(dtype), zero)

    log_probs_BT = clean(log_probs)
    old_log_probs_BT = clean(old_log_probs).detach()
    advantages_BT = clean(advantages).detach()

    terms = POLICY_LOSSES[loss_type](log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, config)
    pg_loss_BT = terms.pg_loss_BT

    rollout_log_probs_BT = tis_weight_BT = tis_capped_BT = None
    if rollout_log_probs is not None:
        rollout_log_probs_BT = clean(rollout_log_probs).detach()
        if config.tis_cap is not None:
            log_tis_BT = old_log_probs_BT - rollout_log_probs_BT
            log_cap = math.log(config.tis_cap)
            tis_capped_BT = log_tis_BT >= log_cap
            tis_weight_BT = torch.exp(log_tis_BT.clamp(max=log_cap))
            pg_loss_BT = pg_loss_BT * tis_weight_BT

    total_BT = pg_loss_BT
    kl_BT = None
    if ref_log_probs is not None:
        kl_BT = KL_PENALTIES[config.kl_type](log_probs_BT, clean(ref_log_probs).detach())
        if config.kl_coef > 0:
            total_BT = total_BT + config.kl_coef * kl_BT
    entropy_BT = None
    if entropy is not None:
        entropy_BT = clean(entropy)
        if config.entropy_coef != 0:
            total_BT = total_BT - config.entropy_coef * entropy_BT
    # Cleaned inputs already give 0 at padding for the built-in terms; a registered loss need not.
    total_BT = torch.where(mask_BT, total_BT, zero)

    if token_weights is None:
        weights_BT = reduction_weights(mask_BT.to(dtype), reduction)
    else:
        weights_BT = token_weights.to(dtype).detach()
    loss = (total_BT * weights_BT).sum()
    pg_loss = (torch.where(mask_BT, pg_loss_BT, zero) * weights_BT).sum()

    metrics = policy_loss_metrics(
        loss=loss, pg_loss=pg_loss, terms=terms, log_probs_BT=log_probs_BT, old_log_probs_BT=old_log_probs_BT,
        advantages_BT=advantages_BT, mask_BT=mask_BT, log_ratio_clamp=config.log_ratio_clamp, kl_BT=kl_BT,
        entropy_BT=entropy_BT, rollout_log_probs_BT=rollout_log_probs_BT, tis_weight_BT=tis_weight_BT,
        tis_capped_BT=tis_capped_BT,
    )
    return loss, metrics
