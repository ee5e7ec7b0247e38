"""``rollout.engine: recorded`` (sapo_megatron/rollout/recorded.py): a recording answers by prompt tokens, in order."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.config import load_config
from sapo_megatron.rollout.base import RolloutResult, SamplingParams
from sapo_megatron.rollout.recorded import RecordedEngine, load_rollouts, save_rollouts


def _result(prompt, response, routes=True):
    n = len(prompt) + len(response) - 1
    return RolloutResult(prompt, response, [-0.5] * len(response), "stop",
                         routes=torch.arange(n * 2, dtype=torch.uint8).view(n, 1, 2) if routes else None,
                         meta={"weight_version": "0", "error": None})


def test_round_trip_and_lookup_by_prompt_in_recorded_order(tmp_path):
    recorded = [_result([1, 2], [3]), _result([4], [5, 6]), _result([1, 2], [7, 8])]
    engine = RecordedEngine(load_rollouts(save_rollouts(recorded, tmp_path / "r.pt")))
    # Another order of prompts (another DP layout): each prompt takes its own results, first recorded first.
    got = engine.generate([[4], [1, 2], [1, 2]], SamplingParams(), return_routes=True)
    assert [g.response_ids for g in got] == [[5, 6], [3], [7, 8]]
    assert torch.equal(got[1].routes, recorded[0].routes) and got[0].meta["weight_version"] == "0"
    with pytest.raises(LookupError, match="no recorded rollout left for prompt 0"):
        engine.generate([[1, 2]], SamplingParams(), return_routes=True)


def test_routes_are_required_under_r3_and_the_path_must_exist(tmp_path):
    engine = RecordedEngine([_result([1], [2], routes=False)])
    with pytest.raises(ValueError, match="has no routes"):
        engine.generate([[1]], SamplingParams(), return_routes=True)
    with pytest.raises(FileNotFoundError, match="rollout.recorded_path"):
        load_rollouts(tmp_path / "missing.pt")


def test_config_needs_a_path_for_the_recorded_engine():
    with pytest.raises(Exception, match="rollout.recorded_path"):
        load_config(None, ["rollout.engine=recorded"])
    assert load_config(None, ["rollout.engine=recorded", "rollout.recorded_path=/x.pt"]).rollout.engine == "recorded"
