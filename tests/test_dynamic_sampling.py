"""Dynamic sampling's group filter and collector (sapo_megatron.rollout.dynamic)."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.config import load_config
from sapo_megatron.rollout.dynamic import GroupCollector, keep_groups


def test_zero_variance_filter():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 2.0, 3.0, 3.0, 3.0])
    completed = torch.tensor([True] * 8 + [False, True, True, True])
    # Groups of 4: [1 1 1 0] varies -> keep; [1 0 .5 .5] -> keep; [2* 3 3 3]: the odd one out
    # was aborted and the completed ones agree -> drop.
    assert keep_groups("zero_variance", rewards, completed, 4) == [True, True, False]
    # Pairs: [1 1] [1 0] [1 0] [.5 .5] [2* 3] (one completed: nothing to compare) [3 3].
    assert keep_groups("zero_variance", rewards, completed, 2) == [False, True, True, False, False, False]


def test_zero_variance_needs_two_completed():
    rewards, completed = torch.tensor([1.0, 0.0]), torch.tensor([True, False])
    assert keep_groups("zero_variance", rewards, completed, 2) == [False]


def test_collector_fills_then_tops_up():
    c = GroupCollector(quota=3)
    c.add(["a", "b", "c"], [True, False, False])
    assert not c.full
    c.add(["d", "e", "f"], [True, True, True])
    assert c.full and c.take() == (["a", "d", "e"], 0)
    assert c.generated == 6 and c.filtered == 2
    short = GroupCollector(quota=3)
    short.add(["a", "b", "c"], [False, True, False])
    groups, topped = short.take()
    assert groups == ["b", "a", "c"] and topped == 2  # never short, never empty


def test_config_keys():
    cfg = load_config(None, ["rollout.dynamic_sampling.filter=zero_variance", "rollout.dynamic_sampling.max_rounds=4"])
    assert cfg.rollout.dynamic_sampling.filter == "zero_variance" and cfg.rollout.dynamic_sampling.max_rounds == 4
    with pytest.raises(Exception, match="rollout.dynamic_sampling.filter"):
        load_config(None, ["rollout.dynamic_sampling.filter=nope"])
    with pytest.raises(Exception, match="rollout.dynamic_sampling.max_rounds"):
        load_config(None, ["rollout.dynamic_sampling.max_rounds=0"])
    with pytest.raises(Exception, match="rollout.max_staleness"):
        load_config(None, ["rollout.max_staleness=-1"])
    with pytest.raises(Exception, match="exactly one of train.micro_batch_size and train.max_tokens_per_microbatch"):
        load_config(None, ["train.max_tokens_per_microbatch=64"])
    cfg = load_config(None, ["train.max_tokens_per_microbatch=64", "train.micro_batch_size=null"])
    assert cfg.train.max_tokens_per_microbatch == 64 and cfg.train.micro_batch_size is None
