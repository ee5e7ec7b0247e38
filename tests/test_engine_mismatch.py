"""The embedded engine's mismatch mode: a bf16 copy and router-logit noise (rollout/engine_copy.py).

References are independent of the code under test: a float64 model holding the copy's
bf16-rounded weights (what bf16 compute approximates), and a Monte-Carlo top-k flip rate
computed from the trainer's own router logits plus fresh gaussian noise.
"""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.mcore.router_replay import install_router_noise, moe_routers
from sapo_megatron.models import ModelConfig, ParallelConfig
from sapo_megatron.rollout.base import SamplingParams
from sapo_megatron.rollout.embedded import EmbeddedEngine
from sapo_megatron.rollout.engine_copy import EngineCopy
from sapo_megatron.routing import (
    agreement_counts,
    attach_routes,
    attach_routing_replay,
    recorded_sample_routes,
    routing_action,
)
from sapo_megatron.step import (
    Sample,
    build_model_chunks,
    collate_padded,
    collect_log_probs,
)

MODEL = ModelConfig(vocab_size=20, num_hidden_layers=3, first_k_dense=1, num_experts=8, num_experts_per_tok=2)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]] * 4


def _chunks(wrap=False):
    chunks = build_model_chunks(MODEL, ParallelConfig(), wrap_ddp=wrap)
    for c in chunks:
        attach_routing_replay(c, MODEL.moe_layer_pattern())
    return chunks


def _samples(results):
    out = []
    for r in results:
        tokens = torch.tensor(r.prompt_ids + r.response_ids)
        n = tokens.numel()
        out.append(Sample(tokens=tokens, loss_mask=torch.ones(n - 1, dtype=torch.bool), old_log_probs=torch.zeros(n - 1),
                          advantages=torch.zeros(n - 1), routes=r.routes))
    return out


@pytest.fixture
def trainer(single_rank_parallel):
    torch.manual_seed(0)
    return _chunks(wrap=True)


def _replayed_log_probs(chunks, samples):
    mb = attach_routes(collate_padded(samples), samples)
    with routing_action(chunks, "replay", with_backward=False):
        return collect_log_probs(chunks, [mb])


def test_bf16_engine_matches_a_float64_model_with_its_rounded_weights(trainer):
    copy = EngineCopy(_chunks(), trainer, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in copy.chunks[0].parameters())
    engine = EmbeddedEngine(trainer, num_experts=MODEL.num_experts, copy=copy)
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=3), return_routes=True)
    samples = _samples(results)
    bf16_lp = torch.cat([torch.tensor(r.response_log_probs, dtype=torch.float64) for r in results])

    def response(lps):
        return torch.cat([lp[-len(r.response_ids):].double() for lp, r in zip(lps, results)])

    # Reference: the same (bf16-rounded) weights in float64, replaying the engine's routes.
    ref = _chunks()
    ref[0].load_state_dict(copy.chunks[0].state_dict())
    ref[0].to(torch.float64)
    ref_lp = response(_replayed_log_probs(ref, samples))
    trainer_lp = response(_replayed_log_probs(trainer, samples))
    bf16_err = (bf16_lp - ref_lp).abs().max()
    # bf16 keeps 8 significant bits: activations of O(1) carry ~2**-9 relative error per op, a
    # few dozen ops deep; measured ~2e-3 nats on log-probs ~ -3, bound 1e-2 (fp32 would be ~1e-6).
    assert bf16_err < 1e-2, bf16_err
    # Guards: bf16 compute is not fp32 compute (the error is far above fp32 noise) ...
    assert bf16_err > 1e-4, bf16_err
    # ... and the fp32 trainer differs from the engine: a real train/rollout gap.
    assert (bf16_lp - trainer_lp).abs().mean() > 1e-4


def test_fp32_copy_without_noise_is_the_trainer(trainer):
    copy = EngineCopy(_chunks(), trainer, dtype="fp32")
    engine = EmbeddedEngine(trainer, num_experts=MODEL.num_experts, copy=copy)
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=3), return_routes=True)
    samples = _samples(results)
    mb = collate_padded(samples)
    with routing_action(trainer, "record", with_backward=False):
        collect_log_probs(trainer, [mb])
        live = recorded_sample_routes(trainer, [mb])
    # The same weights route the same: R2 (trainer's routes) == R3 (engine's) without mismatch.
    assert all(torch.equal(r.routes.long(), l_) for r, l_ in zip(results, live))


def _first_router_logits(chunks, samples):
    """The first MoE router's live logits over the batch (captured around its gating)."""
    _, router = next(moe_routers(chunks[0].module if hasattr(chunks[0], "module") else chunks[0]))
    seen = []
    gating = router.gating

    def capture(x):
        logits = gating(x)
        seen.append(logits.detach().clone())
        return logits

    router.gating = capture
    try:
        with routing_action(chunks, "record", with_backward=False):
            collect_log_probs(chunks, [collate_padded(samples)])
    finally:
        del router.gating  # back to the class's method
    return seen[0]


def test_router_noise_flips_decisions_at_the_expected_rate(trainer):
    std = 0.05
    copy = EngineCopy(_chunks(), trainer, dtype="fp32")
    noise = [h for c in copy.chunks for h in install_router_noise(c, std)]
    engine = EmbeddedEngine(trainer, num_experts=MODEL.num_experts, copy=copy, router_noise=noise)
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=3), return_routes=True)
    samples = _samples(results)
    mb = collate_padded(samples)
    with routing_action(trainer, "record", with_backward=False):
        collect_log_probs(trainer, [mb])
        live = recorded_sample_routes(trainer, [mb])  # R2's routes
    masks = [s.loss_mask for s in samples]
    agree, tokens, differ = agreement_counts([r.routes for r in results], live, masks, [0, 1])
    flip0 = 1 - float(agree[0] / tokens[0])
    # Reference for the first MoE layer (its input is noise-free: the dense layer comes first):
    # the trainer's own router logits of these tokens, plus fresh N(0, std) noise, many draws.
    logits = _first_router_logits(trainer, samples).double()
    valid = ~mb.padding_mask.t().reshape(-1)  # [S, B] router order
    logits = logits.reshape(-1, logits.shape[-1])[valid]
    base = logits.topk(2, dim=-1).indices.sort(-1).values
    gen = torch.Generator().manual_seed(1)
    draws = [(logits + std * torch.randn(logits.shape, generator=gen, dtype=torch.float64)).topk(2, dim=-1)
             .indices.sort(-1).values for _ in range(200)]
    expected = float(torch.stack([(d != base).any(-1) for d in draws]).double().mean())
    # The engine's flip rate is one draw over ~n tokens: binomial sd sqrt(p(1-p)/n); 4 sd + 0.02
    # (the engine's logits come from the generation forwards, whose batch shapes differ by ulps).
    n = float(tokens[0])
    assert 0.02 < expected < 0.6, expected  # the noise scale is in the regime the test can see
    assert abs(flip0 - expected) < 4 * (expected * (1 - expected) / n) ** 0.5 + 0.02, (flip0, expected, n)
    # R2 != R3 under mismatch, and some tokens differ somewhere.
    assert differ.any() and not all(torch.equal(r.routes.long(), l_) for r, l_ in zip(results, live))
    # Reproducible: the same seed draws the same noise (resume exactness rests on it).
    again = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=3), return_routes=True)
    assert all(torch.equal(a.routes, b.routes) and a.response_ids == b.response_ids for a, b in zip(results, again))


@pytest.mark.parametrize("override, message", [
    ("rollout.embedded.dtype=fp16", r"rollout.embedded.dtype must be one of \['bf16', 'fp32'\], got 'fp16'"),
    ("rollout.embedded.router_noise_std=-0.1", r"rollout.embedded.router_noise_std must be a finite float >= 0"),
    ("rollout.embedded.router_noise_std=nan", r"rollout.embedded.router_noise_std must be a finite float >= 0"),
    ("rollout.embedded.dtyp=bf16", r"rollout.embedded.dtyp"),
])
def test_config_errors_name_the_key(override, message):
    from sapo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_defaults_and_values():
    from sapo_megatron.config import load_config

    assert (load_config(None).rollout.embedded.dtype, load_config(None).rollout.embedded.router_noise_std) == ("fp32", 0.0)
    cfg = load_config(None, ["rollout.embedded.dtype=bf16", "rollout.embedded.router_noise_std=0.03"])
    assert (cfg.rollout.embedded.dtype, cfg.rollout.embedded.router_noise_std) == ("bf16", 0.03)
