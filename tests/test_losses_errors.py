"""Bad input raises ValueError naming the input and what was expected."""
import math

import pytest
import torch

from sapo_megatron.losses import POLICY_LOSSES, PolicyLossConfig, compute_policy_loss, kl_penalty

LP = torch.zeros(2, 6)
MASK = torch.ones(2, 6, dtype=torch.bool)


def call(**overrides):
    args = dict(loss_type="sapo", log_probs=LP, old_log_probs=LP, advantages=torch.ones(2, 6), mask=MASK)
    args.update(overrides)
    return compute_policy_loss(args.pop("loss_type"), args.pop("log_probs"), args.pop("old_log_probs"),
                               args.pop("advantages"), args.pop("mask"), **args)


@pytest.mark.parametrize("name", ["old_log_probs", "advantages", "mask", "ref_log_probs", "entropy",
                                  "rollout_log_probs", "token_weights"])
def test_mismatched_shape_names_the_input(name):
    bad = torch.zeros(2, 5, dtype=torch.bool if name == "mask" else torch.float32)
    with pytest.raises(ValueError, match=rf"^{name} has shape \(2, 5\), expected \(2, 6\) like log_probs$"):
        call(**{name: bad})


def test_non_2d_inputs():
    with pytest.raises(ValueError, match=r"log_probs must be 2-D \[batch, tokens\], got shape \(6,\)"):
        call(log_probs=torch.zeros(6))
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\), expected \(2, 6\) like log_probs"):
        call(advantages=torch.zeros(2))
    with pytest.raises(ValueError, match=r"old_log_probs must be a torch.Tensor, got list"):
        call(old_log_probs=[[0.0] * 6] * 2)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'") as info:
        call(loss_type="ppo")
    for name in POLICY_LOSSES:
        assert repr(name) in str(info.value)


def test_unknown_reduction_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reduction 'sum'; known: .*'token_mean'"):
        call(reduction="sum")


@pytest.mark.parametrize(
    "field, value",
    [("tau_pos", 0.0), ("tau_pos", -1.0), ("tau_neg", 0.0), ("tau_neg", float("nan")), ("eps_clip", 0.0),
     ("eps_clip_high", -0.1), ("dual_clip_c", 1.0), ("dual_clip_c", 0.5), ("log_ratio_clamp", 0.0),
     ("log_ratio_clamp", math.inf), ("tis_cap", 0.0), ("kl_coef", -0.1), ("kl_type", "k4"),
     ("entropy_coef", math.nan), ("tau_pos", "1.0")],
)
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.{field} .*got {repr(value)}"):
        PolicyLossConfig(**{field: value})


def test_config_mutated_after_construction_is_caught_by_the_loss():
    config = PolicyLossConfig()
    config.tau_pos = -2.0
    with pytest.raises(ValueError, match=r"PolicyLossConfig\.tau_pos .*got -2.0"):
        call(config=config)


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig, got dict"):
        call(config={"tau_pos": 1.0})


@pytest.mark.parametrize("name", ["advantages", "old_log_probs", "rollout_log_probs", "ref_log_probs",
                                  "token_weights"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_at_a_valid_token_names_the_input(name, bad):
    x = torch.zeros(2, 6)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=rf"^{name} holds NaN or inf at a valid"):
        call(**{name: x})


def test_nan_in_padding_of_data_inputs_is_accepted():
    mask = MASK.clone()
    mask[1, 3] = False
    x = torch.zeros(2, 6)
    x[1, 3] = float("nan")
    loss, _ = call(mask=mask, advantages=x, old_log_probs=x)
    assert torch.isfinite(loss)


def test_mask_must_be_zero_one():
    with pytest.raises(ValueError, match=r"^mask must hold only 0/1"):
        call(mask=torch.full((2, 6), 2.0))


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match=r"unknown kl_type 'k9'; known: \['k1', 'k2', 'k3', 'low_var_kl'\]"):
        kl_penalty(LP, LP, "k9")
    with pytest.raises(ValueError, match=r"ref_log_probs has shape \(2, 5\), expected \(2, 6\) like log_probs"):
        kl_penalty(LP, torch.zeros(2, 5), "k1")
