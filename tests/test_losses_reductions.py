"""Reductions: hand-computed weights on a ragged batch, and split invariance with global counts.

float64 throughout; tolerance 1e-12 covers summation-order rounding only.
"""
import pytest
import torch

from sapo_megatron.losses import REDUCTIONS, compute_policy_loss, reduction_weights

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)

# Row 0: 3 valid tokens, row 1: 1, row 2: none (all padding). T = 4.
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)
VALUES = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]], dtype=F64)
# Hand reductions of VALUES over the valid tokens (2 non-empty sequences):
HAND = {
    "token_mean": (1 + 2 + 3 + 4) / 4,
    "seq_mean_token_mean": ((1 + 2 + 3) / 3 + 4 / 1) / 2,
    "seq_mean_token_sum": ((1 + 2 + 3) + 4) / 2,
    "seq_mean_token_sum_norm": ((1 + 2 + 3) + 4) / (2 * 4),
}


def test_registry_holds_exactly_the_documented_reductions():
    assert set(REDUCTIONS) == set(HAND)


@pytest.mark.parametrize("reduction", sorted(HAND))
def test_reduction_against_hand_computation(reduction):
    weights = reduction_weights(MASK, reduction)
    assert weights.dtype == F64 and weights.shape == MASK.shape
    torch.testing.assert_close((VALUES * weights).sum(), torch.tensor(HAND[reduction], dtype=F64), **TOL)
    assert torch.count_nonzero(weights[MASK == 0]) == 0


def test_hand_weights_seq_mean_token_mean():
    expected = torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)
    torch.testing.assert_close(reduction_weights(MASK, "seq_mean_token_mean"), expected, **TOL)


def test_bool_mask_gives_default_dtype_weights():
    weights = reduction_weights(MASK.bool(), "token_mean")
    assert weights.dtype == torch.get_default_dtype()
    torch.testing.assert_close(weights, (MASK / 4).to(weights.dtype))


@pytest.mark.parametrize("reduction", sorted(HAND))
def test_all_masked_batch_gives_zero_weights_not_nan(reduction):
    weights = reduction_weights(torch.zeros(2, 3, dtype=F64), reduction)
    assert torch.equal(weights, torch.zeros(2, 3, dtype=F64))


def test_explicit_counts_override_local_ones():
    kwargs = dict(num_sequences=10, seq_token_counts_B=torch.tensor([6.0, 2.0, 0.0]), total_tokens=100, norm_length=16)
    valid = MASK == 1
    expected = {
        "token_mean": 1 / 100,
        "seq_mean_token_sum": 1 / 10,
        "seq_mean_token_sum_norm": 1 / (10 * 16),
    }
    for reduction, w in expected.items():
        weights = reduction_weights(MASK, reduction, **kwargs)
        torch.testing.assert_close(weights[valid], torch.full((4,), w, dtype=F64), **TOL)
    weights = reduction_weights(MASK, "seq_mean_token_mean", **kwargs)
    torch.testing.assert_close(weights[0, :3], torch.full((3,), 1 / 60, dtype=F64), **TOL)
    torch.testing.assert_close(weights[1, 0], torch.tensor(1 / 20, dtype=F64), **TOL)
    # Tensor counts (e.g. the result of an all_reduce) work like numbers.
    torch.testing.assert_close(reduction_weights(MASK, "token_mean", total_tokens=torch.tensor(100)),
                               reduction_weights(MASK, "token_mean", total_tokens=100), **TOL)


def ragged_batch(seed=0, batch=6, tokens=7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 0, 6, 3])
    mask = (torch.arange(tokens)[None, :] < lengths[:, None])
    old = -torch.rand(batch, tokens, generator=gen, dtype=F64) * 2
    log_probs = old + (torch.rand(batch, tokens, generator=gen, dtype=F64) - 0.5)
    adv = torch.where(mask, torch.randn(batch, 1, generator=gen, dtype=F64), torch.zeros((), dtype=F64))
    return log_probs, old, adv, mask


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "sapo_seq"])
@pytest.mark.parametrize("reduction", sorted(HAND))
def test_microbatch_split_with_global_counts_equals_whole_batch(loss_type, reduction):
    log_probs, old, adv, mask = ragged_batch()
    whole_lp = log_probs.clone().requires_grad_()
    whole, _ = compute_policy_loss(loss_type, whole_lp, old, adv, mask, reduction=reduction)
    whole.backward()

    global_counts = dict(num_sequences=int(mask.any(-1).sum()), total_tokens=int(mask.sum()))
    split_lp = log_probs.clone().requires_grad_()
    pieces = []
    for rows in (slice(0, 2), slice(2, 6)):
        weights = reduction_weights(mask[rows].to(F64), reduction, **global_counts, norm_length=mask.shape[1])
        piece, _ = compute_policy_loss(loss_type, split_lp[rows], old[rows], adv[rows], mask[rows],
                                       reduction=reduction, token_weights=weights)
        pieces.append(piece)
    total = sum(pieces)
    total.backward()
    torch.testing.assert_close(total, whole, **TOL)
    torch.testing.assert_close(split_lp.grad, whole_lp.grad, **TOL)

    # The naive alternative (each piece reduced locally, then averaged) differs on this ragged
    # split, which is why global counts are needed; this also shows the check above can fail.
    if reduction in ("token_mean", "seq_mean_token_mean"):
        naive = sum(compute_policy_loss(loss_type, log_probs[r], old[r], adv[r], mask[r], reduction=reduction)[0]
                    for r in (slice(0, 2), slice(2, 6))) / 2
        assert abs(naive.item() - whole.item()) > 1e-6


@pytest.mark.parametrize("reduction", sorted(HAND))
def test_token_split_with_full_sequence_counts_equals_whole_batch(reduction):
    """Sequences cut along tokens (as context parallelism does): pass each row's full length."""
    log_probs, old, adv, mask = ragged_batch(seed=1)
    whole, _ = compute_policy_loss("sapo", log_probs, old, adv, mask, reduction=reduction)
    counts = dict(num_sequences=int(mask.any(-1).sum()), total_tokens=int(mask.sum()),
                  seq_token_counts_B=mask.sum(-1), norm_length=mask.shape[1])
    total = 0
    for cols in (slice(0, 3), slice(3, 7)):
        weights = reduction_weights(mask[:, cols].to(F64), reduction, **counts)
        total = total + compute_policy_loss("sapo", log_probs[:, cols], old[:, cols], adv[:, cols], mask[:, cols],
                                            token_weights=weights)[0]
    torch.testing.assert_close(total, whole, **TOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction="mean"), r"unknown reduction 'mean'; known: \['seq_mean_token_mean'"),
        (dict(reduction="token_mean", seq_token_counts_B=torch.ones(2)), r"seq_token_counts_B has shape \(2,\), expected \(3,\)"),
        (dict(reduction="token_mean", num_sequences=-1), r"num_sequences must be >= 0, got -1"),
        (dict(reduction="token_mean", norm_length=0), r"norm_length must be > 0, got 0"),
        (dict(reduction="token_mean", total_tokens="5"), r"total_tokens must be a number or a 0-dim tensor"),
        (dict(reduction="token_mean", total_tokens=torch.ones(2)), r"total_tokens must be a scalar"),
    ],
)
def test_reduction_weights_bad_input(kwargs, match):
    reduction = kwargs.pop("reduction")
    with pytest.raises(ValueError, match=match):
        reduction_weights(MASK, reduction, **kwargs)


def test_reduction_weights_rejects_non_2d_mask():
    with pytest.raises(ValueError, match=r"mask_BT must be 2-D \[batch, tokens\], got shape \(4,\)"):
        reduction_weights(torch.ones(4), "token_mean")
