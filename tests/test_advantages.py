"""GRPO / RLOO advantages and their broadcast, against hand values (float64, tolerance 1e-12)."""
import math

import pytest
import torch

from sapo_megatron.losses import broadcast_advantages, grpo_advantages, rloo_advantages

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def t(values):
    return torch.tensor(values, dtype=F64)


def test_grpo_with_std_hand_values():
    # Group 1: [1, 0, 0, 1], mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3) -> +-0.5 sqrt(3).
    # Group 2: all equal -> std 0 -> advantage 0 (not NaN).
    adv = grpo_advantages(t([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0]), 4, eps=0.0)
    h = 0.5 * math.sqrt(3)
    torch.testing.assert_close(adv, t([h, -h, -h, h, 0.0, 0.0, 0.0, 0.0]), **TOL)


def test_grpo_eps_sits_in_the_denominator():
    adv = grpo_advantages(t([1.0, 0.0]), 2, eps=0.5)
    std = math.sqrt(0.5)  # unbiased std of [1, 0]
    torch.testing.assert_close(adv, t([0.5 / (std + 0.5), -0.5 / (std + 0.5)]), **TOL)


def test_grpo_without_std():
    adv = grpo_advantages(t([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 5.0, 1.0]), 4, normalize_std=False)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 2.0, -2.0]), **TOL)


def test_grpo_group_ids_any_order_and_uneven_sizes():
    # id 7: rewards [1, 3], mean 2, std sqrt(2); id 3: rewards [2, 4, 6], mean 4, std 2.
    adv = grpo_advantages(t([1.0, 2.0, 3.0, 4.0, 6.0]), group_ids=torch.tensor([7, 3, 7, 3, 3]), eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, t([-s, -1.0, s, 0.0, 1.0]), **TOL)


def test_group_ids_and_group_size_agree():
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(grpo_advantages(rewards, 3), grpo_advantages(rewards, group_ids=torch.arange(12) // 3),
                               **TOL)


def test_grpo_singleton_group_gives_zero():
    adv = grpo_advantages(t([5.0, 1.0, 2.0]), group_ids=torch.tensor([0, 1, 1]))
    assert adv[0].item() == 0.0 and torch.isfinite(adv).all()


def test_integer_rewards_are_accepted():
    adv = grpo_advantages(torch.tensor([1, 0]), 2, normalize_std=False)
    assert adv.is_floating_point()
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_rloo_hand_values():
    # r_i - mean of the others: 1 - 1/3, 0 - 2/3.
    adv = rloo_advantages(t([1.0, 0.0, 0.0, 1.0, 2.0, 4.0]), group_ids=torch.tensor([0, 0, 0, 0, 1, 1]))
    torch.testing.assert_close(adv, t([2 / 3, -2 / 3, -2 / 3, 2 / 3, -2.0, 2.0]), **TOL)
    torch.testing.assert_close(rloo_advantages(t([1.0, 0.0, 0.0, 1.0]), 4), t([2 / 3, -2 / 3, -2 / 3, 2 / 3]), **TOL)


def test_rloo_group_of_one_is_an_error():
    with pytest.raises(ValueError, match=r"at least 2 samples per group; group id 9 has 1"):
        rloo_advantages(t([1.0, 2.0, 3.0]), group_ids=torch.tensor([4, 4, 9]))
    with pytest.raises(ValueError, match=r"at least 2 samples per group; group 0 has 1"):
        rloo_advantages(t([1.0, 2.0]), 1)


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_advantage_bad_input(fn):
    with pytest.raises(ValueError, match=r"rewards has 5 entries, not a multiple of group_size=2"):
        fn(t([1.0] * 5), 2)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        fn(t([1.0] * 4))
    with pytest.raises(ValueError, match="exactly one of group_size"):
        fn(t([1.0] * 4), 2, group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[N\], got shape \(2, 2\)"):
        fn(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match=r"^rewards holds NaN or inf"):
        fn(t([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"group_ids must be an integer tensor"):
        fn(t([1.0, 2.0]), group_ids=t([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\), expected \(2,\) like rewards"):
        fn(t([1.0, 2.0]), group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group_size must be a positive int, got 0"):
        fn(t([1.0, 2.0]), 0)


def test_broadcast_advantages():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    out = broadcast_advantages(t([0.5, -1.0, 2.0]), mask)
    torch.testing.assert_close(out, t([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]), **TOL)


def test_broadcast_advantages_bad_input():
    with pytest.raises(ValueError, match=r"adv_B has shape \(2,\), expected \(3,\)"):
        broadcast_advantages(t([1.0, 2.0]), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask_BT must be 2-D"):
        broadcast_advantages(t([1.0]), torch.ones(4, dtype=torch.bool))
