"""The training step on one rank against an independent reference written from the paper.

The reference runs the same network with a plain forward (no Megatron schedule, no DDP, no
vocab-parallel kernel), takes float64 log-softmax over the full vocabulary and applies SAPO's
formula and the seq-mean-token-mean reduction by hand. The step under test runs the same batch
through ``get_forward_backward_func`` in two microbatches with Megatron DDP and
``finalize_model_grads``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sapo_megatron.step import (
    PolicyLossSpec,
    assign_step_weights,
    build_model_chunks,
    collate_padded,
    collect_log_probs,
    run_step,
)
from sapo_megatron.step.batch import dense_attention_mask
from sapo_megatron.step.sharding import unwrap
from tests.helpers import load_full_state_dict
from sapo_megatron.step.synthetic import synthetic_samples
from sapo_megatron.models import ModelConfig, ParallelConfig

MODEL = ModelConfig(num_hidden_layers=2, first_k_dense=0, hidden_size=32, intermediate_size=64)
TAU_POS, TAU_NEG = 0.7, 1.3  # not the defaults: proves the configured taus reach the loss


def _models():
    chunks = build_model_chunks(MODEL, ParallelConfig())
    plain = build_model_chunks(MODEL, ParallelConfig(), wrap_ddp=False)[0]
    load_full_state_dict(plain, {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()})
    return chunks, plain


def _reference_loss(plain, samples):
    mb = collate_padded(samples)
    logits = plain(mb.tokens, mb.position_ids, dense_attention_mask(mb)).double()
    log_probs = torch.log_softmax(logits, -1).gather(-1, mb.labels[..., None])[..., 0]
    per_sample = []
    for b, s in enumerate(samples):
        n = s.tokens.numel() - 1
        lp, old, adv, m = log_probs[b, :n], s.old_log_probs.double(), s.advantages.double(), s.loss_mask
        r = torch.exp(lp - old)
        tau = torch.where(adv > 0, torch.tensor(TAU_POS, dtype=torch.float64), torch.tensor(TAU_NEG, dtype=torch.float64))
        f = torch.sigmoid(tau * (r - 1)) * 4 / tau
        per_sample.append((-f * adv)[m].mean())
    return torch.stack(per_sample).mean(), log_probs, mb


def test_step_matches_hand_written_sapo(single_rank_parallel):
    chunks, plain = _models()
    samples = synthetic_samples(6, vocab_size=MODEL.vocab_size, seed=3, max_length=12)
    microbatches = [collate_padded(samples[:3], min_length=12), collate_padded(samples[3:], min_length=12)]
    microbatches = assign_step_weights(microbatches, "seq_mean_token_mean")
    spec = PolicyLossSpec(tau_pos=TAU_POS, tau_neg=TAU_NEG, logprob_chunk_size=4)
    metrics = run_step(chunks, microbatches, spec)

    ref_loss, _, _ = _reference_loss(plain, samples)
    ref_loss.backward()
    # Loss: float32 network, float64 head; agreement to ~1e-6 relative is expected.
    assert metrics["loss"] == pytest.approx(float(ref_loss), rel=1e-5)
    for name, p in unwrap(chunks[0]).named_parameters():
        ref = dict(plain.named_parameters())[name].grad
        err = float((p.main_grad - ref).norm() / ref.norm().clamp_min(1e-30))
        # float32 forward/backward in both; only summation order differs (see test_dist_step).
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
    assert metrics["num_tokens"] == sum(int(s.loss_mask.sum()) for s in samples)


def test_tau_reaches_the_step(single_rank_parallel):
    chunks, _ = _models()
    samples = synthetic_samples(4, vocab_size=MODEL.vocab_size, seed=4, max_length=10)
    mbs = assign_step_weights([collate_padded(samples)], "token_mean")
    a = run_step(chunks, mbs, PolicyLossSpec(tau_pos=1.0), forward_only=True)
    b = run_step(chunks, mbs, PolicyLossSpec(tau_pos=3.0), forward_only=True)
    assert a["loss"] != pytest.approx(b["loss"], rel=1e-3)


def test_collect_log_probs_matches_reference(single_rank_parallel):
    chunks, plain = _models()
    samples = synthetic_samples(5, vocab_size=MODEL.vocab_size, seed=5, max_length=11)
    rows = collect_log_probs(chunks, [collate_padded(samples[:2], min_length=11), collate_padded(samples[2:], min_length=11)])
    _, ref, _ = _reference_loss(plain, samples)
    assert len(rows) == len(samples)
    for b, (row, s) in enumerate(zip(rows, samples)):
        n = s.tokens.numel() - 1
        assert row.shape == (n,)
        # float32 logits vs float64 log-softmax of the same logits: ~1e-6 absolute.
        assert torch.allclose(row.double(), ref[b, :n], atol=1e-5)
    # On-policy: with these as old log-probs every ratio is exactly 1 at the first update.
    on_policy = [dataclasses.replace(s, old_log_probs=r) for s, r in zip(samples, rows)]
    mbs = assign_step_weights([collate_padded(on_policy)], "token_mean")
    m = run_step(chunks, mbs, PolicyLossSpec(), forward_only=True)
    assert m["ratio_min"] == pytest.approx(1.0, abs=1e-5) and m["ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_missing_weights_is_a_clear_error(single_rank_parallel):
    chunks, _ = _models()
    mb = collate_padded(synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=1))
    with pytest.raises(ValueError, match="assign_step_weights"):
        run_step(chunks, [mb], PolicyLossSpec(), forward_only=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_fused_logprobs_equal_the_unfused_step(single_rank_parallel, tied):
    """loss.fused_logprobs (default) vs false: same old log-probs, loss and every parameter's
    gradient, through Megatron's schedule and DDP; tied embeddings add both uses of the
    embedding weight. Both paths are float32 end to end and differ only in summation order
    (chunked GEMMs vs one), ~1e-7 relative; 1e-5 leaves room and is far below a wrong term
    (the guard below: a perturbed output weight moves the log-probs by far more)."""
    model = dataclasses.replace(MODEL, tie_word_embeddings=tied)
    chunks = build_model_chunks(model, ParallelConfig())
    start = {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}
    samples = synthetic_samples(5, vocab_size=model.vocab_size, seed=6, max_length=11)
    mbs = [collate_padded(samples[:2], min_length=11), collate_padded(samples[2:], min_length=11)]
    mbs = assign_step_weights(mbs, "seq_mean_token_mean")
    runs = {}
    for fused in (True, False):
        for n, p in unwrap(chunks[0]).named_parameters():
            p.data.copy_(start[n])
        rows = collect_log_probs(chunks, mbs, temperature=0.8, chunk_size=3, fused=fused)
        spec = PolicyLossSpec(temperature=0.8, logprob_chunk_size=3, fused_logprobs=fused)
        metrics = run_step(chunks, mbs, spec)
        grads = {n: p.main_grad.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}
        runs[fused] = rows, metrics, grads
    (rows_f, m_f, g_f), (rows_u, m_u, g_u) = runs[True], runs[False]
    for a, b in zip(rows_f, rows_u):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert m_f["loss"] == pytest.approx(m_u["loss"], rel=1e-5)
    assert (unwrap(chunks[0]).output_layer.weight is None) == tied
    for name, g in g_u.items():
        assert float(g.norm()) > 0, f"guard: {name} got no gradient"
        err = float((g_f[name] - g).norm() / g.norm())
        assert err < 1e-5, f"{name}: fused vs unfused relative gradient error {err:.2e}"
    from sapo_megatron.mcore.output_layer import output_weight

    for n, p in unwrap(chunks[0]).named_parameters():
        p.data.copy_(start[n])
    output_weight(chunks[0]).data.add_(0.5 * torch.randn_like(output_weight(chunks[0])))
    moved = collect_log_probs(chunks, mbs, temperature=0.8, chunk_size=3, fused=True)
    assert max(float((a - b).abs().max()) for a, b in zip(moved, rows_u)) > 1e-2  # guard: it reads the weight


def test_fused_logprobs_bypass_the_output_layer(single_rank_parallel, monkeypatch):
    """The fused path never runs the output layer's matmul (so no [T, V] logits exist), still
    runs the layer's forward pre-hooks (DDP's all-gather wait under overlap_param_gather), and
    leaves the layer as it found it."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    chunks, _ = _models()
    layer = unwrap(chunks[0]).output_layer
    calls = []
    original = ColumnParallelLinear._forward_impl
    monkeypatch.setattr(ColumnParallelLinear, "_forward_impl",
                        lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    pre_hooks = []
    layer.register_forward_pre_hook(lambda module, args: pre_hooks.append(module))
    mbs = [collate_padded(synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=2))]
    collect_log_probs(chunks, mbs, fused=True)
    assert layer not in calls and pre_hooks == [layer]
    collect_log_probs(chunks, mbs, fused=False)
    assert layer in calls  # guard: the hook does see the unfused path's matmul
    assert "forward" not in vars(layer)  # the instance patch (0.16) is undone


def test_every_log_prob_pass_takes_the_loss_options(single_rank_parallel, monkeypatch):
    """The old-log-prob, reference, live-route and doctor passes compute log-probs as the update
    does: the loss's temperature, fused switch AND chunk size (the chunk size was once dropped)."""
    import sapo_megatron.step.run as run

    spec = PolicyLossSpec(temperature=0.7, logprob_chunk_size=5, fused_logprobs=False)
    assert spec.pass_options() == {"temperature": 0.7, "fused": False, "chunk_size": 5}
    seen = []
    original = run.token_log_probs
    monkeypatch.setattr(run, "token_log_probs", lambda *a, **k: seen.append(k) or original(*a, **k))
    chunks, _ = _models()
    mbs = [collate_padded(synthetic_samples(2, vocab_size=MODEL.vocab_size, seed=2))]
    collect_log_probs(chunks, mbs, **spec.pass_options())
    assert seen and all(k["chunk_size"] == 5 and k["temperature"] == 0.7 and k["output_weight"] is None for k in seen)
