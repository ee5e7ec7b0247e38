"""KL penalty, entropy bonus, TIS and metrics against hand values and written-out formulas.

float64 throughout; tolerance 1e-12 covers rounding order only.
"""
import math

import pytest
import torch

from sapo_megatron.losses import KL_PENALTIES, PolicyLossConfig, compute_policy_loss, kl_penalty

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def t(values):
    return torch.tensor(values, dtype=F64)


LP = t([[-1.0, -0.5, -2.0, -0.1]])
REF = t([[-1.5, -0.5, -1.0, -30.1]])  # d = ref - lp = -0.5, 0, 1, -30


@pytest.mark.parametrize("kl_type", sorted(KL_PENALTIES))
def test_kl_types_against_formulas(kl_type):
    d = [-0.5, 0.0, 1.0, -30.0]
    formulas = {
        "k1": [-x for x in d],
        "k2": [0.5 * x * x for x in d],
        "k3": [math.exp(x) - x - 1 for x in d],
        # d clamped to [-20, 20], then the value to [-10, 10]: the last entry (19 + e^-20) caps at 10.
        "low_var_kl": [min(math.exp(max(min(x, 20), -20)) - max(min(x, 20), -20) - 1, 10.0) for x in d],
    }
    torch.testing.assert_close(kl_penalty(LP, REF, kl_type), t([formulas[kl_type]]), **TOL)
    assert formulas["low_var_kl"][3] == 10.0


def test_low_var_kl_clamps_large_positive_log_ratio():
    out = kl_penalty(t([[0.0]]), t([[50.0]]), "low_var_kl")  # d = 50 -> 20 -> e^20 - 21 -> capped at 10
    assert out.item() == 10.0


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_term_is_added_to_loss_with_its_gradient(kl_type):
    lp = t([[-1.0, -0.5, -2.0]])
    ref = t([[-1.2, -0.4, -1.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = t([[1.0, -1.0, 0.5]])
    base_lp = lp.clone().requires_grad_()
    base, metrics0 = compute_policy_loss("sapo", base_lp, lp, adv, mask, reduction="token_mean")
    base.backward()
    kl_lp = lp.clone().requires_grad_()
    config = PolicyLossConfig(kl_coef=0.3, kl_type=kl_type)
    loss, metrics = compute_policy_loss("sapo", kl_lp, lp, adv, mask, reduction="token_mean", config=config,
                                        ref_log_probs=ref)
    loss.backward()
    # d = ref - lp; per-token KL and its derivative wrt lp, written out:
    d = ref - lp
    values = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1, "low_var_kl": torch.exp(d) - d - 1}[kl_type]
    dvalues = {"k1": torch.ones_like(d), "k2": -d, "k3": 1 - torch.exp(d), "low_var_kl": 1 - torch.exp(d)}[kl_type]
    torch.testing.assert_close(loss, base + 0.3 * values.mean(), **TOL)
    torch.testing.assert_close(kl_lp.grad, base_lp.grad + 0.3 * dvalues / 3, **TOL)
    torch.testing.assert_close(metrics["kl"], values.mean(), **TOL)
    assert "kl" not in metrics0


def test_kl_with_zero_coef_is_only_a_metric():
    lp, ref = t([[-1.0, -0.5]]), t([[-1.3, -0.2]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = t([[1.0, 1.0]])
    without, _ = compute_policy_loss("sapo", lp, lp, adv, mask)
    with_ref, metrics = compute_policy_loss("sapo", lp, lp, adv, mask, ref_log_probs=ref)
    torch.testing.assert_close(with_ref, without, **TOL)
    d = ref - lp
    torch.testing.assert_close(metrics["kl"], (torch.exp(d) - d - 1).mean(), **TOL)


def test_entropy_bonus():
    lp = t([[-1.0, -0.5, -2.0]])
    mask = torch.tensor([[True, True, False]])
    adv = t([[1.0, 1.0, 0.0]])
    entropy = t([[0.7, 1.9, 123.0]]).requires_grad_()
    base, _ = compute_policy_loss("sapo", lp, lp, adv, mask, reduction="token_mean")
    loss, metrics = compute_policy_loss("sapo", lp, lp, adv, mask, reduction="token_mean", entropy=entropy,
                                        config=PolicyLossConfig(entropy_coef=0.01))
    loss.backward()
    torch.testing.assert_close(loss, base - 0.01 * (0.7 + 1.9) / 2, **TOL)
    torch.testing.assert_close(entropy.grad, t([[-0.01 / 2, -0.01 / 2, 0.0]]), **TOL)
    torch.testing.assert_close(metrics["entropy"], t((0.7 + 1.9) / 2), **TOL)


def test_tis_weights_cap_and_clip_fraction():
    old = t([[-1.0, -1.0, -1.0]])
    rollout = old - t([[math.log(0.5), math.log(1.5), math.log(4.0)]])  # exp(old - rollout) = 0.5, 1.5, 4
    log_probs = old + t([[0.1, -0.2, 0.3]])
    adv = t([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    lp = log_probs.clone().requires_grad_()
    loss, metrics = compute_policy_loss("sapo", lp, old, adv, mask, reduction="token_mean",
                                        rollout_log_probs=rollout, config=PolicyLossConfig(tis_cap=2.0))
    loss.backward()
    tis = t([[0.5, 1.5, 2.0]])  # min(w, 2)

    ref_lp = log_probs.clone().requires_grad_()
    r = torch.exp(ref_lp - old)
    tau = torch.where(adv > 0, t(1.0), t(1.05))
    ref = (-torch.sigmoid(tau * (r - 1)) * 4 / tau * adv * tis).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(lp.grad, ref_lp.grad, **TOL)
    torch.testing.assert_close(metrics["tis_clip_frac"], t(1 / 3), **TOL)
    torch.testing.assert_close(metrics["tis_weight_mean"], t((0.5 + 1.5 + 2.0) / 3), **TOL)
    torch.testing.assert_close(metrics["train_rollout_logprob_abs_diff"],
                               t((math.log(2) + math.log(1.5) + math.log(4)) / 3), **TOL)


def test_rollout_log_probs_without_tis_cap_only_report_the_mismatch():
    old, adv, mask = t([[-1.0, -2.0]]), t([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    lp = old + 0.2
    plain, _ = compute_policy_loss("sapo", lp, old, adv, mask)
    loss, metrics = compute_policy_loss("sapo", lp, old, adv, mask, rollout_log_probs=old - t([[0.5, -0.25]]))
    torch.testing.assert_close(loss, plain, **TOL)
    torch.testing.assert_close(metrics["train_rollout_logprob_abs_diff"], t(0.375), **TOL)
    assert "tis_clip_frac" not in metrics


def test_sapo_metrics_on_known_ratios():
    # tau = 1 for both signs. Gradient weight sech^2((r - 1) / 2): r - 1 = 2 -> sech^2(1) = 0.42 (low);
    # r - 1 = 0.2 -> 0.990; r - 1 = -0.9 -> sech^2(0.45) = 0.83; r = 1 -> 1. So low_weight_frac = 1/4.
    ratios = [3.0, 1.2, 0.1, 1.0]
    old = t([[-2.0, -2.0, -2.0, -2.0, -2.0]])
    log_probs = old + t([[math.log(r) for r in ratios] + [5.0]])
    adv = t([[1.0, 1.0, 1.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, metrics = compute_policy_loss("sapo", log_probs, old, adv, mask, config=PolicyLossConfig(tau_neg=1.0))
    assert 1 / math.cosh(1.0) ** 2 < 0.5 < 1 / math.cosh(0.45) ** 2
    gate = [1 / (1 + math.exp(-(r - 1))) * 4 for r in ratios]
    expected = {
        "num_tokens": 4.0,
        "num_sequences": 1.0,
        "low_weight_frac": 0.25,
        "gate_mean_pos": sum(gate[:3]) / 3,
        "gate_mean_neg": gate[3],
        "ratio_min": 0.1,
        "ratio_max": 3.0,
        "ratio_mean": sum(ratios) / 4,
        "approx_kl": sum(r - 1 - math.log(r) for r in ratios) / 4,
        "loss": -(sum(gate[:3]) - 2 * gate[3]) / 4,
        "pg_loss": -(sum(gate[:3]) - 2 * gate[3]) / 4,
    }
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], t(value), **TOL, msg=key)
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad and value.is_floating_point()
    assert "clip_frac" not in metrics


def test_clip_metrics_on_known_ratios():
    # eps = 0.2: r = 1.5, A > 0 clipped (weight 1.2); r = 0.5, A > 0 not (min picks r A, weight 0.5);
    # r = 1, A < 0 not; r = 0.7, A < 0 clipped (weight 0.8). clip_frac = 1/2.
    ratios = [1.5, 0.5, 1.0, 0.7]
    old = torch.zeros(1, 4, dtype=F64)
    log_probs = t([[math.log(r) for r in ratios]])
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    _, metrics = compute_policy_loss("grpo", log_probs, old, adv, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(metrics["clip_frac"], t(0.5), **TOL)
    torch.testing.assert_close(metrics["low_weight_frac"], t(0.5), **TOL)
    torch.testing.assert_close(metrics["gate_mean_pos"], t((1.2 + 0.5) / 2), **TOL)
    torch.testing.assert_close(metrics["gate_mean_neg"], t((1.0 + 0.8) / 2), **TOL)


def test_metrics_with_no_valid_token_are_zero_not_nan():
    lp = t([[-1.0, -2.0]]).requires_grad_()
    loss, metrics = compute_policy_loss("sapo", lp, lp.detach() - 0.3, t([[1.0, 1.0]]), torch.zeros(1, 2, dtype=torch.bool),
                                        ref_log_probs=t([[0.0, 0.0]]), entropy=t([[1.0, 1.0]]),
                                        rollout_log_probs=t([[0.0, 0.0]]), config=PolicyLossConfig(tis_cap=2.0))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(lp.grad) == 0
    assert all(v.item() == 0.0 for v in metrics.values())
    assert {"kl", "entropy", "train_rollout_logprob_abs_diff", "tis_clip_frac"} <= set(metrics)
