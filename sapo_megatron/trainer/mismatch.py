"""Train/inference mismatch figures: what the trainer logs per step, and their summary over a run.

The trainer computes, for every step whose rollout came with the engine's log-probs (and routes,
for the routing figures):
- ``train_rollout_logprob_abs_diff``: mean |train - rollout| log-prob per response token, the
  train side being the old-log-prob pass under the run's routing mode (replayed under R3);
- ``train_rollout_logprob_abs_diff_live``: the same with the trainer routing live (no replay),
  measured by one extra forward pass when the engine sent routes;
- ``train_rollout_gate_low_frac`` (and ``..._live``): the share of those tokens whose SAPO
  gradient weight ``sech^2(tau/2 (r - 1))`` falls below 0.5 at ``r = exp(train - rollout)``,
  with ``tau`` = ``tau_pos`` / ``tau_neg`` by the sign of the token's advantage: tokens the
  soft gate already half-silences before any policy update, from mismatch alone;
- ``routing/live_agreement_moe<m>`` / ``routing/live_agreement_mean``: the share of (token,
  layer) routes where the trainer's live top-k set equals the engine's.

:func:`summarise` turns a run's ``metrics.jsonl`` rows into the figures of ``docs/sglang.md``
(tools/measure_mismatch.py), so the doctor and the docs read the same numbers the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sapo_megatron.losses.policy import sapo_gradient_weight

LOW_GATE = 0.5

#: metric -> the figure's name in the summary (means over the steps that report it).
FIGURES = {
    "train_rollout_logprob_abs_diff": "logprob_abs_diff_r3",
    "train_rollout_logprob_abs_diff_live": "logprob_abs_diff_live",
    "train_rollout_gate_low_frac": "gate_low_frac_r3",
    "train_rollout_gate_low_frac_live": "gate_low_frac_live",
    "routing/live_agreement_mean": "routing_agreement_live",
    "routing/live_token_differ_frac": "token_routes_differ_live",
    "entropy": "entropy",
}


@torch.no_grad()
def gap_counts(train_lp: Tensor, rollout_lp: Tensor, mask: Tensor, advantages: Tensor | float,
               tau_pos: float, tau_neg: float) -> tuple[float, float, float]:
    """``(sum |train - rollout|, tokens with SAPO gradient weight < 0.5, tokens)`` over ``mask``.

    ``advantages`` is the sequence's (scalar) or per-token advantage; ``A > 0`` takes
    ``tau_pos``, otherwise ``tau_neg`` (as :func:`sapo_megatron.losses.policy.sapo_tau`)."""
    mask = mask.bool()
    gap = (train_lp.double() - rollout_lp.double()).masked_fill(~mask, 0.0)
    adv = torch.as_tensor(advantages, dtype=torch.float64).expand_as(gap)
    tau = torch.where(adv > 0, torch.full_like(gap, tau_pos), torch.full_like(gap, tau_neg))
    weight = sapo_gradient_weight(torch.exp(gap), tau)
    low = (weight < LOW_GATE) & mask
    return float(gap.abs().sum()), float(low.sum()), float(mask.sum())


def summarise(rows: list[dict]) -> dict[str, float]:
    """Means over the RL steps of each figure (supervised cold-start rows are left out: their
    entropy is the SFT batch's), plus per-layer live agreement and the RL step count."""
    rows = [r for r in rows if r.get("phase") != "cold_start"]
    out: dict[str, float] = {}
    for metric, name in FIGURES.items():
        values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        if values:
            out[name] = sum(values) / len(values)
    layers = sorted({k for r in rows for k in r if k.startswith("routing/live_agreement_moe")},
                    key=lambda k: int(k.rsplit("moe", 1)[1]))
    for key in layers:
        values = [r[key] for r in rows if key in r]
        out[f"routing_agreement_live_{key.rsplit('_', 1)[1]}"] = sum(values) / len(values)
    out["steps"] = float(len(rows))
    return out
