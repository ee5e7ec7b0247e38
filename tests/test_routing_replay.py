"""Routing replay on one rank: R2 record -> replay, the consumption checks, and bad use."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay

from sapo_megatron.step import (
    PolicyLossSpec,
    assign_step_weights,
    build_model_chunks,
    collate_packed,
    collate_padded,
    collect_log_probs,
    run_step,
)
from sapo_megatron.step.sharding import unwrap
from sapo_megatron.step.synthetic import synthetic_samples
from sapo_megatron.models import ModelConfig, ParallelConfig
from sapo_megatron.routing import (
    attach_routes,
    attach_routing_replay,
    recorded_sample_routes,
    replay_metrics,
    routing_action,
)
from sapo_megatron.routing.replay import same_topk_set

MODEL = ModelConfig(num_hidden_layers=3, first_k_dense=1, num_experts=6, num_experts_per_tok=2, vocab_size=40)


@pytest.fixture
def chunks(single_rank_parallel):
    before = len(RouterReplay.global_router_replay_instances)
    chunks = build_model_chunks(MODEL, ParallelConfig())
    attach_routing_replay(chunks[0], MODEL.moe_layer_pattern())
    # Per-model bookkeeping: Megatron's process-global list is left alone, and every MoE router
    # (layers 1 and 2) holds a hook that is still a RouterReplay to upstream's isinstance checks.
    assert len(RouterReplay.global_router_replay_instances) == before
    hooks = [layer.mlp.router.router_replay for layer in unwrap(chunks[0]).decoder.layers if hasattr(layer.mlp, "router")]
    assert len(hooks) == 2 and all(isinstance(h, RouterReplay) for h in hooks)
    assert [h.layer.moe_index for h in hooks] == [1, 2]
    return chunks


def _batches(samples, layout):
    collate = collate_padded if layout == "padded" else collate_packed
    return [collate(samples[:3], min_length=40), collate(samples[3:], min_length=40)]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_r2_record_then_replay_reproduces_live_log_probs(chunks, layout):
    samples = synthetic_samples(6, vocab_size=MODEL.vocab_size, seed=2, max_length=12)
    mbs = _batches(samples, layout)
    with routing_action(chunks, "record", with_backward=False):
        live = collect_log_probs(chunks, mbs)
        recorded = recorded_sample_routes(chunks, mbs)
    assert [r.shape for r in recorded] == [(s.tokens.numel() - 1, 2, 2) for s in samples]
    routed = [dataclasses.replace(s, routes=r.to(torch.uint8)) for s, r in zip(samples, recorded)]
    replay_mbs = [attach_routes(mb, group) for mb, group in zip(_batches(routed, layout), (routed[:3], routed[3:]))]
    with routing_action(chunks, "replay", with_backward=False):
        replayed = collect_log_probs(chunks, replay_mbs)
    for a, b in zip(live, replayed):
        assert torch.equal(a, b), "replaying the model's own routes must not change anything"
    stats = replay_metrics(chunks)
    assert stats["routing/agreement_mean"] == 1.0
    tokens = sum(s.tokens.numel() for s in samples)
    assert stats["routing/fallback_frac"] == pytest.approx(len(samples) / tokens)


def test_replay_forces_the_given_routes(chunks):
    """Replaying other routes changes the log-probs, and the step trains through them."""
    samples = synthetic_samples(6, vocab_size=MODEL.vocab_size, seed=3, max_length=12)
    gen = torch.Generator().manual_seed(0)
    forced = []
    for s in samples:
        n = s.tokens.numel() - 1
        ids = torch.stack([torch.randperm(MODEL.num_experts, generator=gen)[:2] for _ in range(n * 2)])
        forced.append(dataclasses.replace(s, routes=ids.view(n, 2, 2).to(torch.uint8)))
    mbs = [attach_routes(mb, g) for mb, g in zip(_batches(forced, "padded"), (forced[:3], forced[3:]))]
    with routing_action(chunks, "compare", with_backward=False) as controllers:
        controllers[0].keep_used = True
        live = collect_log_probs(chunks, mbs)
        used_live = recorded_sample_routes(chunks, mbs)
    with routing_action(chunks, "replay", with_backward=False) as controllers:
        controllers[0].keep_used = True
        replayed = collect_log_probs(chunks, mbs)
        used = recorded_sample_routes(chunks, mbs)
    for s, u, ul in zip(forced, used, used_live):
        assert torch.equal(u.long(), s.routes.long())
        assert not same_topk_set(ul.reshape(-1, 2), s.routes.long().reshape(-1, 2)).all()
    assert any(not torch.allclose(a, b) for a, b in zip(live, replayed))
    weighted = assign_step_weights(mbs, "token_mean")
    with routing_action(chunks, "replay", with_backward=True):
        metrics = run_step(chunks, weighted, PolicyLossSpec())
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_replay_without_routes_is_a_clear_error(chunks):
    mb = collate_padded(synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=1))
    with pytest.raises(ValueError, match="carries no routes"):
        with routing_action(chunks, "replay", with_backward=False):
            collect_log_probs(chunks, [mb])


def test_unconsumed_routes_are_reported(chunks):
    samples = synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=1)
    routed = [dataclasses.replace(s, routes=torch.zeros(s.tokens.numel() - 1, 2, 2, dtype=torch.uint8) + torch.tensor([0, 1], dtype=torch.uint8)) for s in samples]
    mb = attach_routes(collate_padded(routed), routed)
    with pytest.raises(RuntimeError, match="never used by a forward"):
        with routing_action(chunks, "replay", with_backward=False) as controllers:
            controllers[0].on_microbatch(mb.routes)  # pushed, but no forward runs


def test_bad_arguments(chunks):
    with pytest.raises(ValueError, match="unknown routing replay action"):
        with routing_action(chunks, "replay_everything", with_backward=False):
            pass
    samples = synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=1)
    with pytest.raises(ValueError, match="carry no routes"):
        attach_routes(collate_padded(samples), samples)
    wrong = [dataclasses.replace(s, routes=torch.zeros(s.tokens.numel() - 1, 5, 2, dtype=torch.uint8)) for s in samples]
    mb = attach_routes(collate_padded(wrong), wrong)
    with pytest.raises(ValueError, match="cover 5 MoE layers, the model has 2"):
        with routing_action(chunks, "replay", with_backward=False):
            collect_log_probs(chunks, [mb])
