"""SAPO and baseline policy losses for RL training: pure math on plain ``[batch, tokens]`` tensors.

Layout (one concern per module): ``config`` (PolicyLossConfig), ``policy`` (per-token losses and
their registry), ``reductions`` (per-token weights), ``kl`` (KL estimators), ``advantages``
(GRPO / RLOO), ``metrics`` (diagnostics), ``compute`` (the ``compute_policy_loss`` entry point).
Nothing here touches torch.distributed; the training step brings global counts through
``reduction_weights`` and ``token_weights``.

Single-process use::

    loss, metrics = compute_policy_loss("sapo", logp_BT, old_logp_BT, adv_BT, mask_BT)
    loss.backward()
"""
from .advantages import broadcast_advantages, grpo_advantages, rloo_advantages
from .compute import compute_policy_loss
from .config import DEFAULT_DUAL_CLIP_C, PolicyLossConfig
from .kl import KL_PENALTIES, kl_penalty, register_kl_penalty
from .metrics import masked_mean
from .policy import (
    POLICY_LOSSES,
    PolicyLossTerms,
    register_policy_loss,
    sapo_gate,
    sapo_gradient_weight,
)
from .reductions import REDUCTIONS, reduction_weights, register_reduction

__all__ = [
    "DEFAULT_DUAL_CLIP_C",
    "KL_PENALTIES",
    "POLICY_LOSSES",
    "REDUCTIONS",
    "PolicyLossConfig",
    "PolicyLossTerms",
    "broadcast_advantages",
    "compute_policy_loss",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "reduction_weights",
    "register_kl_penalty",
    "register_policy_loss",
    "register_reduction",
    "rloo_advantages",
    "sapo_gate",
    "sapo_gradient_weight",
]
