"""Policy losses against hand-derived values and reference formulas written out here.

Everything runs in float64, so value and gradient comparisons use tight tolerances (1e-12
relative): the implementation and the references differ only by rounding order.
"""
import math

import pytest
import torch

from sapo_megatron.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    compute_policy_loss,
    reduction_weights,
    register_policy_loss,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)  # float64, same formula up to rounding order


def t(values):
    return torch.tensor(values, dtype=F64)


def loss_and_grad(loss_type, log_probs, old_log_probs, advantages, mask, **kwargs):
    log_probs = log_probs.detach().clone().requires_grad_()
    loss, metrics = compute_policy_loss(loss_type, log_probs, old_log_probs, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, log_probs)
    return loss.detach(), grad, metrics


def reference_grad(fn, log_probs):
    log_probs = log_probs.detach().clone().requires_grad_()
    value = fn(log_probs)
    (grad,) = torch.autograd.grad(value, log_probs)
    return value.detach(), grad


def sapo_reference(log_probs, old_log_probs, advantages, tau_pos, tau_neg):
    """The paper's per-token SAPO loss: -sigmoid(tau (r - 1)) * 4 / tau * A."""
    r = torch.exp(log_probs - old_log_probs)
    tau = torch.where(advantages > 0, t(tau_pos), t(tau_neg))
    return -torch.sigmoid(tau * (r - 1)) * 4 / tau * advantages


# Ragged batch of 2 rows, T = 4; weights worked out by hand for each reduction
# (5 valid tokens, 2 sequences of lengths 3 and 2).
RAGGED_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
HAND_WEIGHTS = {
    "token_mean": [[1 / 5, 1 / 5, 1 / 5, 0], [1 / 5, 1 / 5, 0, 0]],
    "seq_mean_token_mean": [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 4, 1 / 4, 0, 0]],
    "seq_mean_token_sum": [[1 / 2, 1 / 2, 1 / 2, 0], [1 / 2, 1 / 2, 0, 0]],
    "seq_mean_token_sum_norm": [[1 / 8, 1 / 8, 1 / 8, 0], [1 / 8, 1 / 8, 0, 0]],
}


@pytest.mark.parametrize("adv", [2.5, -0.7])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.3, 4.0), (5.0, 0.2)])
def test_sapo_gradient_at_ratio_one_is_minus_advantage_single_token(adv, taus):
    old = t([[-1.3]])
    config = PolicyLossConfig(tau_pos=taus[0], tau_neg=taus[1])
    for reduction in HAND_WEIGHTS:  # every reduction gives weight 1 to a single token with T = 1
        loss, grad, _ = loss_and_grad("sapo", old.clone(), old, t([[adv]]), torch.ones(1, 1, dtype=torch.bool),
                                      config=config, reduction=reduction)
        # f(1) = sigmoid(0) * 4 / tau = 2 / tau, so the value is -2 A / tau.
        tau = taus[0] if adv > 0 else taus[1]
        torch.testing.assert_close(loss, t(-2 * adv / tau), **TOL)
        torch.testing.assert_close(grad, t([[-adv]]), **TOL)


@pytest.mark.parametrize("reduction", sorted(HAND_WEIGHTS))
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_gradient_at_ratio_one_with_reduction_weights(reduction, taus):
    old = t([[-0.5, -1.0, -2.0, -0.1], [-0.3, -0.9, -1.1, -4.0]])
    adv = t([[1.5, 1.5, 1.5, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    _, grad, _ = loss_and_grad("sapo", old.clone(), old, adv, RAGGED_MASK,
                               config=PolicyLossConfig(tau_pos=taus[0], tau_neg=taus[1]), reduction=reduction)
    torch.testing.assert_close(grad, -adv * t(HAND_WEIGHTS[reduction]), **TOL)


def test_sapo_matches_paper_formula_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 7, generator=gen, dtype=F64) * 3
    log_probs = old + (torch.rand(3, 7, generator=gen, dtype=F64) - 0.5) * 2  # r in [e^-1, e]
    adv = torch.randn(3, 7, generator=gen, dtype=F64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    config = PolicyLossConfig(tau_pos=0.8, tau_neg=2.5)
    loss, grad, _ = loss_and_grad("sapo", log_probs, old, adv, mask, config=config, reduction="token_mean")
    ref_loss, ref_grad = reference_grad(lambda lp: sapo_reference(lp, old, adv, 0.8, 2.5).mean(), log_probs)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_sapo_uses_tau_pos_for_positive_and_tau_neg_for_negative_advantages(adv):
    old, log_probs = t([[-1.0]]), t([[-1.0 + math.log(1.7)]])  # r = 1.7
    mask = torch.ones(1, 1, dtype=torch.bool)
    config = PolicyLossConfig(tau_pos=0.5, tau_neg=3.0)
    loss, _, _ = loss_and_grad("sapo", log_probs, old, t([[adv]]), mask, config=config)
    used, other = (0.5, 3.0) if adv > 0 else (3.0, 0.5)
    expected = -(1 / (1 + math.exp(-used * 0.7))) * 4 / used * adv
    wrong = -(1 / (1 + math.exp(-other * 0.7))) * 4 / other * adv
    torch.testing.assert_close(loss, t(expected), **TOL)
    assert abs(expected - wrong) > 0.1  # the two taus are far enough apart for the check to bite


def test_configured_tau_reaches_the_loss():
    old = t([[-1.0, -2.0]])
    log_probs = old + t([[0.4, 0.4]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    pos = t([[1.0, 1.0]])
    neg = t([[-1.0, -1.0]])
    base = PolicyLossConfig()
    loss_pos_a, _, _ = loss_and_grad("sapo", log_probs, old, pos, mask, config=base)
    loss_pos_b, _, _ = loss_and_grad("sapo", log_probs, old, pos, mask, config=PolicyLossConfig(tau_pos=4.0))
    assert abs(loss_pos_a.item() - loss_pos_b.item()) > 1e-3
    loss_neg_a, _, _ = loss_and_grad("sapo", log_probs, old, neg, mask, config=base)
    loss_neg_b, _, _ = loss_and_grad("sapo", log_probs, old, neg, mask, config=PolicyLossConfig(tau_pos=4.0))
    torch.testing.assert_close(loss_neg_a, loss_neg_b, **TOL)  # tau_pos does not touch A < 0 tokens
    loss_neg_c, _, _ = loss_and_grad("sapo", log_probs, old, neg, mask, config=PolicyLossConfig(tau_neg=4.0))
    assert abs(loss_neg_a.item() - loss_neg_c.item()) > 1e-3


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_zero_advantage_gives_zero_loss_and_zero_gradient(loss_type):
    old = t([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]])
    log_probs = old + t([[0.3, -0.8, 2.0], [-0.1, 0.0, 0.5]])
    loss, grad, _ = loss_and_grad(loss_type, log_probs, old, torch.zeros(2, 3, dtype=F64),
                                  torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_extreme_log_ratio_gives_finite_value_and_gradient(loss_type, dtype):
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    log_probs = old + torch.tensor([[100.0, -100.0, 100.0, -100.0]], dtype=dtype)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=dtype)
    ref = old - 100.0
    config = PolicyLossConfig(kl_coef=0.1, tis_cap=2.0)
    log_probs = log_probs.requires_grad_()
    loss, metrics = compute_policy_loss(loss_type, log_probs, old, adv, torch.ones(1, 4, dtype=torch.bool),
                                        config=config, ref_log_probs=ref, rollout_log_probs=old - 100.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(log_probs.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_masked_tokens_do_not_affect_loss_or_get_gradient(loss_type):
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    old = t([[-1.0, -0.5, 0.0, 0.0], [-2.0, -0.3, -0.7, 0.0]])
    log_probs = old + t([[0.1, -0.2, 0.0, 0.0], [0.3, 0.05, -0.15, 0.0]])
    adv = t([[1.0, 1.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 0.0]])
    garbage = ~mask
    log_probs_g = torch.where(garbage, t(1e4), log_probs)
    old_g = torch.where(garbage, t(-3e4), old)
    adv_g = torch.where(garbage, t(1e3), adv)
    for reduction in HAND_WEIGHTS:
        clean_loss, clean_grad, _ = loss_and_grad(loss_type, log_probs, old, adv, mask, reduction=reduction)
        loss, grad, _ = loss_and_grad(loss_type, log_probs_g, old_g, adv_g, mask, reduction=reduction)
        torch.testing.assert_close(loss, clean_loss, **TOL)
        torch.testing.assert_close(grad, clean_grad, **TOL)
        assert torch.count_nonzero(grad[garbage]) == 0


def test_nan_in_padding_of_log_probs_does_not_leak():
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    loss, grad, _ = loss_and_grad("sapo", t([[-1.0, float("nan")]]), t([[-1.2, float("nan")]]), t([[1.0, 0.0]]), mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0, 1].item() == 0.0


def test_float_mask_equals_bool_mask():
    old = t([[-1.0, -0.5, -0.2]])
    log_probs = old + t([[0.2, -0.1, 0.3]])
    adv = t([[1.0, 1.0, 1.0]])
    a, ga, _ = loss_and_grad("sapo", log_probs, old, adv, torch.tensor([[True, True, False]]))
    b, gb, _ = loss_and_grad("sapo", log_probs, old, adv, t([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ga, gb, **TOL)


def clip_reference(log_probs, old, adv, eps_low, eps_high):
    r = torch.exp(log_probs - old)
    return -torch.min(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv)


# log-ratios that land in every region of the clip: inside, above 1 + eps_high, below 1 - eps.
LOG_RATIOS = [[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.7), math.log(1.25), math.log(5.0)],
              [math.log(1.5), math.log(0.5), math.log(0.9), math.log(0.7), math.log(1.25), math.log(0.1)]]
ADVS = [[1.0, 1.0, 1.0, -1.0, 1.0, -2.0], [-1.0, -1.0, -3.0, 2.0, -1.0, 0.5]]


def test_grpo_hand_values():
    old = torch.zeros(1, 2, dtype=F64)
    log_probs = t([[math.log(1.5), math.log(0.5)]])
    adv = t([[1.0, 1.0]])
    config = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28)
    loss, grad, _ = loss_and_grad("grpo", log_probs, old, adv, torch.ones(1, 2, dtype=torch.bool), config=config,
                                  reduction="seq_mean_token_sum")
    # token 1: r = 1.5 clipped to 1.28 -> loss -1.28, grad 0; token 2: r = 0.5 < 0.8, min picks r A -> -0.5,
    # d(-r A)/dlogp = -r A = -0.5.
    torch.testing.assert_close(loss, t(-1.28 - 0.5), **TOL)
    torch.testing.assert_close(grad, t([[0.0, -0.5]]), **TOL)


@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.1, 0.3)])
def test_grpo_matches_reference(eps):
    old = t([[-1.0] * 6, [-0.5] * 6])
    log_probs = old + t(LOG_RATIOS)
    adv = t(ADVS)
    mask = torch.ones(2, 6, dtype=torch.bool)
    config = PolicyLossConfig(eps_clip=eps[0], eps_clip_high=eps[1])
    eps_high = eps[0] if eps[1] is None else eps[1]
    loss, grad, _ = loss_and_grad("grpo", log_probs, old, adv, mask, config=config, reduction="token_mean")
    ref_loss, ref_grad = reference_grad(lambda lp: clip_reference(lp, old, adv, eps[0], eps_high).mean(), log_probs)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("c", [None, 2.0, 10.0])
def test_dual_clip_matches_reference(c):
    old = t([[-1.0] * 6, [-0.5] * 6])
    log_probs = old + t(LOG_RATIOS)
    adv = t(ADVS)
    mask = torch.ones(2, 6, dtype=torch.bool)
    config = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28, dual_clip_c=c)
    const = 3.0 if c is None else c

    def reference(lp):
        pg = clip_reference(lp, old, adv, 0.2, 0.28)
        return torch.where(adv < 0, torch.min(pg, -adv * const), pg).mean()

    loss, grad, _ = loss_and_grad("dual_clip", log_probs, old, adv, mask, config=config, reduction="token_mean")
    ref_loss, ref_grad = reference_grad(reference, log_probs)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_dual_clip_hand_value_and_default_constant():
    # r = 5, A = -1: PPO loss max(5, 1.2) = 5; dual clip min(5, -A c) = c (3 by default), no gradient.
    old, log_probs, adv = t([[0.0]]), t([[math.log(5.0)]]), t([[-1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, grad, metrics = loss_and_grad("dual_clip", log_probs, old, adv, mask)
    torch.testing.assert_close(loss, t(3.0), **TOL)
    assert grad.item() == 0.0
    assert metrics["dual_clip_frac"].item() == 1.0 and metrics["gate_mean_neg"].item() == 3.0
    loss2, _, _ = loss_and_grad("dual_clip", log_probs, old, adv, mask, config=PolicyLossConfig(dual_clip_c=4.5))
    torch.testing.assert_close(loss2, t(4.5), **TOL)
    grpo_loss, _, _ = loss_and_grad("grpo", log_probs, old, adv, mask)
    torch.testing.assert_close(grpo_loss, t(5.0), **TOL)


# Sequence-level references are written WITHOUT GSPO's stop-gradient trick: one ratio per
# sequence s_i = exp(mean_t log r_it), loss = mean_i(-g(s_i) A_i). With seq_mean_token_mean the
# stop-gradient per-token form has the same value and the same gradient (each token's loss is
# -g(s_i) A_i with weight 1/(L_i N); d/dlogp_t of its term is g'(s_i) s_i), so this checks the
# trick against the definition.
SEQ_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
SEQ_ADV = [1.3, 0.7, -2.0]  # with seq_inputs' ratios (0.92, 1.11, 0.97): rows 1, 2 clip at tiny eps


def seq_ratio_reference(log_probs, old, mask):
    m = mask.to(F64)
    return torch.exp(((log_probs - old) * m).sum(-1) / m.sum(-1))


def seq_inputs():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(3, 5, generator=gen, dtype=F64) * 2
    log_probs = old + (torch.rand(3, 5, generator=gen, dtype=F64) - 0.5)
    adv_B = t(SEQ_ADV)
    adv = torch.where(SEQ_MASK, adv_B[:, None], t(0.0))
    return log_probs, old, adv_B, adv


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.4, 6.0)])
def test_sapo_seq_matches_sequence_level_reference(taus):
    log_probs, old, adv_B, adv = seq_inputs()
    config = PolicyLossConfig(tau_pos=taus[0], tau_neg=taus[1])

    def reference(lp):
        s = seq_ratio_reference(lp, old, SEQ_MASK)
        tau = torch.where(adv_B > 0, t(taus[0]), t(taus[1]))
        return (-torch.sigmoid(tau * (s - 1)) * 4 / tau * adv_B).mean()

    loss, grad, _ = loss_and_grad("sapo_seq", log_probs, old, adv, SEQ_MASK, config=config)
    ref_loss, ref_grad = reference_grad(reference, log_probs)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_sapo_seq_gradient_at_ratio_one_is_minus_advantage_over_length_and_count():
    _, old, adv_B, adv = seq_inputs()
    _, grad, _ = loss_and_grad("sapo_seq", old.clone(), old, adv, SEQ_MASK)
    lengths = t([4, 2, 5])
    expected = torch.where(SEQ_MASK, (-adv_B / (lengths * 3))[:, None], t(0.0))  # -A_i / (L_i N), N = 3
    torch.testing.assert_close(grad, expected, **TOL)


@pytest.mark.parametrize("eps", [(0.2, None), (3e-4, 4e-4)])
def test_gspo_matches_sequence_level_reference(eps):
    log_probs, old, adv_B, adv = seq_inputs()
    config = PolicyLossConfig(eps_clip=eps[0], eps_clip_high=eps[1])
    eps_high = eps[0] if eps[1] is None else eps[1]

    def reference(lp):
        s = seq_ratio_reference(lp, old, SEQ_MASK)
        return (-torch.min(s * adv_B, torch.clamp(s, 1 - eps[0], 1 + eps_high) * adv_B)).mean()

    loss, grad, metrics = loss_and_grad("gspo", log_probs, old, adv, SEQ_MASK, config=config)
    ref_loss, ref_grad = reference_grad(reference, log_probs)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    if eps[0] < 1e-3:  # GSPO's tiny eps clips rows 1 and 2 (2 + 5 of the 11 valid tokens)
        torch.testing.assert_close(metrics["clip_frac"], t(7 / 11), **TOL)


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("reduction", sorted(HAND_WEIGHTS))
def test_loss_is_weighted_sum_of_per_token_loss(loss_type, reduction):
    log_probs, old, _, adv = seq_inputs()
    loss, _, _ = loss_and_grad(loss_type, log_probs, old, adv, SEQ_MASK, reduction=reduction)
    weights = reduction_weights(SEQ_MASK.to(F64), reduction)  # float64 mask -> float64 weights
    # The per-token loss comes out of token_weights = one-hot columns; summing them back with
    # the reduction's weights must give the reduced loss.
    per_token = torch.zeros(3, 5, dtype=F64)
    for b in range(3):
        for i in range(5):
            one_hot = torch.zeros(3, 5, dtype=F64)
            one_hot[b, i] = 1.0
            per_token[b, i] = compute_policy_loss(loss_type, log_probs, old, adv, SEQ_MASK, token_weights=one_hot)[0]
    torch.testing.assert_close(loss, (per_token * weights).sum(), **TOL)
    if loss_type == "sapo":
        ref = sapo_reference(log_probs, old, adv, 1.0, 1.05) * SEQ_MASK
        torch.testing.assert_close(per_token, ref, **TOL)


def test_token_weights_replace_reduction():
    log_probs, old, _, adv = seq_inputs()
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    a, ga, _ = loss_and_grad("sapo", log_probs, old, adv, SEQ_MASK, token_weights=weights, reduction="token_mean")
    b, gb, _ = loss_and_grad("sapo", log_probs, old, adv, SEQ_MASK, token_weights=weights,
                             reduction="seq_mean_token_sum")
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ga, gb, **TOL)
    ref = (sapo_reference(log_probs, old, adv, 1.0, 1.05) * SEQ_MASK * weights).sum()
    torch.testing.assert_close(a, ref, **TOL)


def test_log_ratio_clamp_from_config_is_applied():
    old, log_probs, adv = t([[0.0]]), t([[3.0]]), t([[1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, grad, _ = loss_and_grad("grpo", log_probs, old, adv, mask,
                                  config=PolicyLossConfig(log_ratio_clamp=1.0, eps_clip=10.0))
    torch.testing.assert_close(loss, t(-math.e), **TOL)  # r = exp(clamp(3, -1, 1)) = e, inside the clip
    assert grad.item() == 0.0  # no gradient past the clamp


def test_old_log_probs_are_treated_as_constants():
    # On-policy call with old_log_probs=log_probs (not detached): still the r = 1 gradient -A.
    log_probs = t([[-0.4, -1.1]]).requires_grad_()
    loss, _ = compute_policy_loss("sapo", log_probs, log_probs, t([[1.0, -2.0]]), torch.ones(1, 2, dtype=torch.bool),
                                  reduction="seq_mean_token_sum")
    loss.backward()
    torch.testing.assert_close(log_probs.grad, t([[-1.0, 2.0]]), **TOL)


def test_register_policy_loss_adds_a_usable_loss():
    from sapo_megatron.losses.policy import PolicyLossTerms

    @register_policy_loss("test_reinforce")
    def reinforce(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, config):
        ratio = torch.exp(log_probs_BT - old_log_probs_BT)
        return PolicyLossTerms(pg_loss_BT=-log_probs_BT * advantages_BT, ratio_BT=ratio.detach(),
                               weight_BT=torch.ones_like(ratio), low_weight_BT=torch.zeros_like(mask_BT))

    try:
        loss, grad, _ = loss_and_grad("test_reinforce", t([[-0.5, -1.0]]), t([[-0.5, -1.0]]), t([[2.0, 2.0]]),
                                      torch.ones(1, 2, dtype=torch.bool), reduction="token_mean")
        torch.testing.assert_close(loss, t((0.5 + 1.0) / 2 * 2.0), **TOL)  # mean of -logp * A
        torch.testing.assert_close(grad, t([[-1.0, -1.0]]), **TOL)
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_reinforce")(reinforce)
    finally:
        POLICY_LOSSES.pop("test_reinforce")


def test_bf16_inputs_are_computed_in_float32():
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    log_probs = old.clone().requires_grad_()
    loss, metrics = compute_policy_loss("sapo", log_probs, old, torch.tensor([[1.0, -1.0]], dtype=torch.bfloat16),
                                        torch.ones(1, 2, dtype=torch.bool), reduction="seq_mean_token_sum")
    loss.backward()
    assert loss.dtype == torch.float32 and metrics["loss"].dtype == torch.float32
    torch.testing.assert_close(log_probs.grad.float(), torch.tensor([[-1.0, 1.0]]))
