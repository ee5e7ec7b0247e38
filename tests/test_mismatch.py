"""The mismatch figures (trainer/mismatch.py) against the paper's gate, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.trainer.mismatch import gap_counts, summarise


def _weight(r: float, tau: float) -> float:
    # SAPO's gradient weight: d/dr of sigmoid(tau (r - 1)) * 4 / tau, = sech^2(tau (r - 1) / 2).
    return 1.0 / math.cosh(tau * (r - 1) / 2) ** 2


def test_gap_counts_match_the_formula():
    gen = torch.Generator().manual_seed(3)
    train = -torch.rand(3, 7, generator=gen) * 4
    rollout = train + torch.randn(3, 7, generator=gen) * 1.5
    mask = torch.rand(3, 7, generator=gen) > 0.3
    adv = torch.tensor([[1.0], [-0.5], [0.0]]).expand(3, 7)
    abs_sum, low, tokens = gap_counts(train, rollout, mask, adv, tau_pos=1.0, tau_neg=1.05)
    want_abs = want_low = 0.0
    for b in range(3):
        for t in range(7):
            if not mask[b, t]:
                continue
            gap = float(train[b, t]) - float(rollout[b, t])
            want_abs += abs(gap)
            tau = 1.0 if adv[b, t] > 0 else 1.05
            want_low += _weight(math.exp(gap), tau) < 0.5
    assert abs_sum == pytest.approx(want_abs, rel=1e-12)
    assert low == want_low and tokens == float(mask.sum())
    assert 0 < low < tokens, "the case exercises both sides of the threshold"


def test_no_gap_no_low_gate():
    lp = -torch.rand(2, 5)
    assert gap_counts(lp, lp.clone(), torch.ones(2, 5, dtype=torch.bool), 1.0, 1.0, 1.05) == (0.0, 0.0, 10.0)


def test_summarise_means_over_the_steps_that_report():
    rows = [{"step": 0, "train_rollout_logprob_abs_diff": 0.2, "routing/live_agreement_moe0": 0.9,
             "routing/live_agreement_moe1": 1.0},
            {"step": 1, "train_rollout_logprob_abs_diff": 0.4, "train_rollout_logprob_abs_diff_live": 0.5,
             "routing/live_agreement_moe0": 0.7, "routing/live_agreement_moe1": 0.8}]
    out = summarise([{"phase": "cold_start", "entropy": 9.0, "step": 0}] + rows)
    assert out["logprob_abs_diff_r3"] == pytest.approx(0.3)
    assert out["logprob_abs_diff_live"] == pytest.approx(0.5)
    assert out["routing_agreement_live_moe0"] == pytest.approx(0.8)
    assert out["routing_agreement_live_moe1"] == pytest.approx(0.9)
    assert out["steps"] == 2.0 and "entropy" not in out, "cold-start rows are not RL steps"
