"""Deterministic synthetic RL samples, for the distributed tests and the one-step demo.

They look like what a rollout produces (a prompt, a response, rewards of both signs, old
log-probs near a fresh model's ``-log(vocab)`` so that ratios straddle 1), and depend only on the
seed, so every rank of a distributed run builds the same global batch.
"""

from __future__ import annotations

import math

import torch

from sapo_megatron.step.batch import Sample


def synthetic_samples(
    num_samples: int,
    *,
    vocab_size: int,
    seed: int = 0,
    min_length: int = 6,
    max_length: int = 16,
    with_ref: bool = False,
    with_rollout: bool = False,
) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        length = int(torch.randint(min_length, max_length + 1, (), generator=gen))
        prompt = int(torch.randint(1, max(2, length // 2), (), generator=gen))
        tokens = torch.randint(0, vocab_size, (length,), generator=gen)
        mask = torch.zeros(length - 1, dtype=torch.bool)
        mask[prompt - 1 :] = True
        noise = lambda: 0.3 * torch.randn(length - 1, generator=gen)  # noqa: E731
        base = -math.log(vocab_size)
        advantage = float(torch.randn((), generator=gen))
        samples.append(
            Sample(
                tokens=tokens,
                loss_mask=mask,
                old_log_probs=base + noise(),
                advantages=torch.full((length - 1,), advantage),
                ref_log_probs=base + noise() if with_ref else None,
                rollout_log_probs=base + noise() if with_rollout else None,
            )
        )
    return samples
