"""The embedded rollout engine: SGLang-shaped results from the trainer's own model.

Its token log-probs and routes must be exactly what the trainer recomputes for the same tokens
when it replays those routes (same weights): that is the property R3 relies on. Under
torchrun (``tests/dist/embedded_ep_worker.py``): expert parallelism spanning DP replicas, whose
ranks must generate in lockstep, against each rank's prompts generated alone on one rank.
"""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.step import Sample, build_model_chunks, collate_padded, collect_log_probs
from sapo_megatron.models import ModelConfig, ParallelConfig
from sapo_megatron.rollout.base import SamplingParams
from sapo_megatron.rollout.embedded import EmbeddedEngine
from sapo_megatron.routing import attach_routes, attach_routing_replay, routing_action
from tests.launch import torchrun

MODEL = ModelConfig(vocab_size=20, num_hidden_layers=3, first_k_dense=1, num_experts=6, num_experts_per_tok=2)


@pytest.fixture
def engine_and_chunks(single_rank_parallel):
    chunks = build_model_chunks(MODEL, ParallelConfig())
    attach_routing_replay(chunks[0], MODEL.moe_layer_pattern())
    return EmbeddedEngine(chunks, num_experts=MODEL.num_experts, seed=3), chunks


def test_results_are_sglang_shaped_and_reproducible(engine_and_chunks):
    engine, _ = engine_and_chunks
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = SamplingParams(temperature=1.0, max_new_tokens=5, stop_token_ids=(0,), seed=11)
    out = engine.generate(prompts, params, return_routes=True)
    again = engine.generate(prompts, params, return_routes=True)
    for r, r2, p in zip(out, again, prompts):
        assert r.prompt_ids == p
        assert 1 <= len(r.response_ids) <= 5
        assert len(r.response_log_probs) == len(r.response_ids)
        assert r.finish_reason == ("stop" if r.response_ids[-1] == 0 else "length")
        assert r.routes.shape == (len(p) + len(r.response_ids) - 1, 2, 2)
        assert r.routes.dtype == torch.uint8
        assert r.response_ids == r2.response_ids, "a fixed seed reproduces the rollout"


def test_trainer_recomputes_engine_log_probs_under_replayed_routes(engine_and_chunks):
    engine, chunks = engine_and_chunks
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, seed=2), return_routes=True)
    samples = []
    for r in out:
        tokens = torch.tensor(r.prompt_ids + r.response_ids)
        n = tokens.numel()
        samples.append(Sample(tokens=tokens, loss_mask=torch.ones(n - 1, dtype=torch.bool),
                              old_log_probs=torch.zeros(n - 1), advantages=torch.zeros(n - 1), routes=r.routes))
    mb = attach_routes(collate_padded(samples), samples)
    with routing_action(chunks, "replay", with_backward=False):
        lp = collect_log_probs(chunks, [mb])
    for r, row in zip(out, lp):
        k = len(r.response_ids)
        # Same weights, same routes; batch shapes differ (the engine's batch shrinks as
        # sequences stop), so float32 matmuls differ by ulps: 1e-5 on log-probs ~ -3.
        assert torch.allclose(row[-k:].double(), torch.tensor(r.response_log_probs, dtype=torch.float64), atol=1e-5)


def test_top_p_and_bad_prompts(engine_and_chunks):
    engine, _ = engine_and_chunks
    out = engine.generate([[1, 2]] * 4, SamplingParams(top_p=1e-6, max_new_tokens=3, seed=1), return_routes=False)
    assert len({tuple(r.response_ids) for r in out}) == 1, "top_p -> greedy: every sample agrees"
    assert out[0].routes is None
    with pytest.raises(ValueError, match="at least 2 tokens"):
        engine.generate([[1]], SamplingParams(), return_routes=False)


@pytest.mark.dist
@pytest.mark.slow
def test_ep_spanning_dp_replicas_generates_what_each_rank_generates_alone(tmp_path):
    """EP=2, TP=1 on 2 ranks: the MoE exchange spans the two DP replicas, which stop at
    different steps, hold prompts of other counts and lengths, or none (the worker's CALLS).
    Every rank must still get what it gets alone on one rank at EP=1."""
    worker = "tests/dist/embedded_ep_worker.py"
    weights, ref_out, ep_out = tmp_path / "w.pt", tmp_path / "ref.pt", tmp_path / "ep.pt"
    torchrun(worker, "--save-weights", weights, "--out", ref_out, nproc=1, timeout=300)
    # A hang (a rank waiting in the expert exchange for a rank that stopped) ends here.
    torchrun(worker, "--ep", "2", "--weights", weights, "--out", ep_out, nproc=2, timeout=180)
    ref, got = torch.load(ref_out), torch.load(ep_out)
    assert set(got) == set(ref) == {0, 1} and got[0]["empty"] == []
    for rank in (0, 1):
        assert set(got[rank]) == set(ref[rank]) == {"early_stop", "uneven", "empty"}
        for call, results in got[rank].items():
            for g, r in zip(results, ref[rank][call], strict=True):
                assert g["prompt"] == r["prompt"]
                # Greedy decoding of the same weights: the same tokens and routes. Log-probs
                # differ by float32 ulps (other batch shapes, experts on two ranks): 1e-5.
                assert g["response"] == r["response"] and g["finish"] == r["finish"], (rank, call)
                assert torch.equal(g["routes"], r["routes"]), (rank, call)
                assert torch.allclose(torch.tensor(g["log_probs"]), torch.tensor(r["log_probs"]), atol=1e-5, rtol=0)
    # Not vacuous: DP rank 0 stopped after one token while DP rank 1 ran on to the limit, and
    # both ranks' experts served tokens (experts 0-1 live on EP rank 0, 2-3 on EP rank 1).
    assert all(len(r["response"]) == 1 and r["finish"] == "stop" for c in ("early_stop", "uneven") for r in got[0][c])
    assert all(len(r["response"]) == 6 and r["finish"] == "length" for c in got[1] for r in got[1][c])
    used = torch.cat([r["routes"].flatten().long() for calls in got.values() for rs in calls.values() for r in rs])
    assert (used < 2).any() and (used >= 2).any()
