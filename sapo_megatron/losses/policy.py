"""Per-token policy-gradient losses: SAPO (token and sequence level) and clip baselines.

Design choices:
- A registry ``POLICY_LOSSES`` (name -> function) with a ``register_policy_loss`` decorator; the
  entry point looks the name up, so a new loss is one decorated function.
- Every loss has the same signature ``fn(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT,
  config) -> PolicyLossTerms`` and returns the loss *per token*, before any reduction:
  reduction is a separate concern (``reductions.py``) because the distributed step needs to
  apply step-global weights.
- Inputs arrive already cleaned by ``compute_policy_loss``: masked positions hold 0 in every
  tensor (``torch.where``, whose backward sends exactly zero gradient to masked positions), so
  the losses need the mask only for sequence-level means.
- The log-ratio is clamped to +-``log_ratio_clamp`` before ``exp`` in every loss: r = exp(>88)
  is inf in float32 and its gradient NaN. Past the clamp the gradient is zero (the SAPO gate is
  saturated there anyway, and a clip loss would have zeroed it too).
- SAPO is exactly arXiv 2511.20347: r = exp(logp - old_logp), tau = tau_pos if A > 0 else
  tau_neg (A == 0 takes tau_neg, harmless: the loss is 0), f(r) = sigmoid(tau (r - 1)) * 4 / tau,
  loss = -f(r) A. At r = 1, d loss / d logp = -A (4/tau * tau * sigmoid'(0) = 1).
- Sequence-level losses (``gspo``, ``sapo_seq``) use GSPO's stop-gradient form
  s_it = sg(s_i) * exp(logp_t - sg(logp_t)), s_i = exp(mean over valid t of log r_it): the value
  is the sequence ratio, the gradient flows per token like GSPO's.
- Besides the loss, each function returns what the metrics need: the (detached) ratio it gates
  or clips, the effective weight w with loss = -w A (f(r) for SAPO, the chosen ratio for clip
  losses), a per-token "low weight" flag (SAPO: gradient weight sech^2(tau/2 (r-1)) < 0.5; clip
  losses: the clip is active) and extra per-token indicators (clip fractions).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .config import PolicyLossConfig

SAPO_LOW_WEIGHT_THRESHOLD = 0.5


@dataclass
class PolicyLossTerms:
    pg_loss_BT: Tensor  # per-token policy-gradient loss, with grad
    ratio_BT: Tensor  # detached ratio the loss gates / clips (sequence ratio for sequence losses)
    weight_BT: Tensor  # detached effective weight w, pg_loss = -w * A
    low_weight_BT: Tensor  # bool, see module docstring
    indicators_BT: dict[str, Tensor] = field(default_factory=dict)  # bool, averaged into metrics


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossConfig], PolicyLossTerms]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def token_log_ratio(log_probs_BT: Tensor, old_log_probs_BT: Tensor, clamp: float) -> Tensor:
    return (log_probs_BT - old_log_probs_BT).clamp(-clamp, clamp)


# How the per-sequence sums of a sequence-level ratio are completed: identity on one rank; the
# distributed step installs an all-reduce over the context-parallel group, whose ranks each hold
# part of every sequence (see ``sequence_sums_reduced_by``).
_SEQUENCE_SUMS: ContextVar[Callable[[Tensor], Tensor] | None] = ContextVar("sequence_sums", default=None)


@contextlib.contextmanager
def sequence_sums_reduced_by(reduce: Callable[[Tensor], Tensor]):
    """Within the block, ``reduce([2, B] detached (sum of log r, token count))`` completes each
    sequence's sums before its mean is taken (the values carry no gradient: GSPO's
    stop-gradient form)."""
    token = _SEQUENCE_SUMS.set(reduce)
    try:
        yield
    finally:
        _SEQUENCE_SUMS.reset(token)


def sequence_log_ratio(log_probs_BT: Tensor, old_log_probs_BT: Tensor, mask_BT: Tensor, clamp: float) -> Tensor:
    """GSPO's per-token log s_it = sg(mean_t log r_it) + logp_t - sg(logp_t), clamped."""
    diff_BT = torch.where(mask_BT, log_probs_BT - old_log_probs_BT, torch.zeros_like(log_probs_BT))
    sums_2B = torch.stack([diff_BT.detach().sum(dim=-1), mask_BT.sum(dim=-1).to(log_probs_BT.dtype)])
    reduce = _SEQUENCE_SUMS.get()
    if reduce is not None:
        sums_2B = reduce(sums_2B)
    seq_log_ratio_B = sums_2B[0] / sums_2B[1].clamp_min(1)
    return (seq_log_ratio_B.detach()[:, None] + log_probs_BT - log_probs_BT.detach()).clamp(-clamp, clamp)


def sapo_gate(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """The paper's soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau."""
    return torch.sigmoid(tau * (ratio - 1)) * (4 / tau)


def sapo_gradient_weight(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """sech^2(tau/2 (r - 1)) = 4 sigmoid(x)(1 - sigmoid(x)), x = tau (r - 1); 1 at r = 1."""
    s = torch.sigmoid(tau * (ratio - 1))
    return 4 * s * (1 - s)


def sapo_tau(advantages_BT: Tensor, config: PolicyLossConfig) -> Tensor:
    tau_pos = advantages_BT.new_tensor(config.tau_pos)
    tau_neg = advantages_BT.new_tensor(config.tau_neg)
    return torch.where(advantages_BT > 0, tau_pos, tau_neg)


def _sapo_terms(ratio_BT: Tensor, advantages_BT: Tensor, config: PolicyLossConfig) -> PolicyLossTerms:
    tau_BT = sapo_tau(advantages_BT, config)
    gate_BT = sapo_gate(ratio_BT, tau_BT)
    ratio_d = ratio_BT.detach()
    return PolicyLossTerms(
        pg_loss_BT=-gate_BT * advantages_BT,
        ratio_BT=ratio_d,
        weight_BT=gate_BT.detach(),
        low_weight_BT=sapo_gradient_weight(ratio_d, tau_BT) < SAPO_LOW_WEIGHT_THRESHOLD,
    )


def _clip_terms(ratio_BT: Tensor, advantages_BT: Tensor, eps_low: float, eps_high: float) -> PolicyLossTerms:
    clipped_ratio_BT = ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    surrogate_BT = ratio_BT * advantages_BT
    clipped_surrogate_BT = clipped_ratio_BT * advantages_BT
    is_clipped_BT = clipped_surrogate_BT < surrogate_BT
    return PolicyLossTerms(
        pg_loss_BT=-torch.minimum(surrogate_BT, clipped_surrogate_BT),
        ratio_BT=ratio_BT.detach(),
        weight_BT=torch.where(is_clipped_BT, clipped_ratio_BT, ratio_BT).detach(),
        low_weight_BT=is_clipped_BT,
        indicators_BT={"clip_frac": is_clipped_BT},
    )


@register_policy_loss("sapo")
def sapo_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
              config: PolicyLossConfig) -> PolicyLossTerms:
    ratio_BT = torch.exp(token_log_ratio(log_probs_BT, old_log_probs_BT, config.log_ratio_clamp))
    return _sapo_terms(ratio_BT, advantages_BT, config)


@register_policy_loss("sapo_seq")
def sapo_seq_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
                  config: PolicyLossConfig) -> PolicyLossTerms:
    ratio_BT = torch.exp(sequence_log_ratio(log_probs_BT, old_log_probs_BT, mask_BT, config.log_ratio_clamp))
    return _sapo_terms(ratio_BT, advantages_BT, config)


@register_policy_loss("grpo")
def grpo_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
              config: PolicyLossConfig) -> PolicyLossTerms:
    ratio_BT = torch.exp(token_log_ratio(log_probs_BT, old_log_probs_BT, config.log_ratio_clamp))
    return _clip_terms(ratio_BT, advantages_BT, config.eps_clip, config.eps_high)


@register_policy_loss("dual_clip")
def dual_clip_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
                   config: PolicyLossConfig) -> PolicyLossTerms:
    """PPO clip, plus for A < 0: loss = min(clipped loss, -c A) (Ye et al. 2020; verl)."""
    terms = grpo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, config)
    c = config.dual_clip_constant
    dual_bound_BT = -c * advantages_BT
    negative_BT = advantages_BT < 0
    dual_active_BT = negative_BT & (dual_bound_BT < terms.pg_loss_BT)
    terms.pg_loss_BT = torch.where(negative_BT, torch.minimum(terms.pg_loss_BT, dual_bound_BT), terms.pg_loss_BT)
    terms.weight_BT = torch.where(dual_active_BT, terms.weight_BT.new_tensor(c), terms.weight_BT)
    terms.low_weight_BT = terms.low_weight_BT | dual_active_BT
    terms.indicators_BT["dual_clip_frac"] = dual_active_BT
    return terms


@register_policy_loss("gspo")
def gspo_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
              config: PolicyLossConfig) -> PolicyLossTerms:
    """GSPO (arXiv 2507.18071): PPO clip on the sequence ratio; eps taken from the config as is
    (GSPO's paper uses ~3e-4 / 4e-4, set them in the config)."""
    ratio_BT = torch.exp(sequence_log_ratio(log_probs_BT, old_log_probs_BT, mask_BT, config.log_ratio_clamp))
    return _clip_terms(ratio_BT, advantages_BT, config.eps_clip, config.eps_high)


@register_policy_loss("nll")
def nll_loss(log_probs_BT: Tensor, old_log_probs_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
             config: PolicyLossConfig) -> PolicyLossTerms:
    """Advantage-weighted negative log-likelihood, loss = -A log p (no ratio, no gate).

    With A = 1 on reference responses it is the supervised cross-entropy of a cold start
    (``trainer/cold_start.py``), run through the same Megatron step as the RL losses. It ignores
    ``old_log_probs``: as an RL loss it would be on-policy REINFORCE, so the ratio it reports is
    exp(logp - old) for the metrics only, and no token counts as low-weight.
    """
    ratio_BT = torch.exp(token_log_ratio(log_probs_BT, old_log_probs_BT, config.log_ratio_clamp)).detach()
    return PolicyLossTerms(
        pg_loss_BT=-log_probs_BT * advantages_BT,
        ratio_BT=ratio_BT,
        weight_BT=torch.ones_like(ratio_BT),
        low_weight_BT=torch.zeros_like(mask_BT, dtype=torch.bool),
    )
