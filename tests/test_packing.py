"""Packing that packs: a packed row is the sum of its samples' lengths, and training on it is
training on the same samples padded (one process, the local spec, a small MoE).

- The trainer's collation (``trainer/batching.py``) builds rows of ``packed_row_length``; the old
  rule (longest sample x samples per row) cannot come back unnoticed.
- One packed row of several unequal samples, with a padding tail, gives the padded
  microbatch's log-probs AND parameter gradients, with live routing and with R3 routes replayed.
- The local spec's dense mask is built in the forward step, one microbatch at a time.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from sapo_megatron.models import ModelConfig, ParallelConfig
from sapo_megatron.routing import attach_routes, attach_routing_replay, routing_action
from sapo_megatron.step import PolicyLossSpec, assign_step_weights, build_model_chunks, collect_log_probs, run_step
from sapo_megatron.step import run as step_run
from sapo_megatron.step.batch import collate_packed, collate_padded, packed_row_length
from sapo_megatron.step.sharding import unwrap
from sapo_megatron.step.synthetic import synthetic_samples
from sapo_megatron.trainer.batching import StepBatcher, collate_microbatch

MODEL = ModelConfig(num_hidden_layers=3, first_k_dense=1, num_experts=6, num_experts_per_tok=2, vocab_size=40)
PAD_MULTIPLE = 8  # leaves a padding tail in the packed row (as TP=8 with SP would)


def _train_cfg(**kw):
    base = dict(updates_per_rollout=1, micro_batch_size=4, max_tokens_per_microbatch=None, layout="packed")
    return types.SimpleNamespace(**{**base, **kw})


def test_trainer_rows_hold_the_sum_of_lengths_not_longest_times_count():
    samples = synthetic_samples(8, vocab_size=40, seed=7, min_length=5, max_length=60)
    batcher = StepBatcher(_train_cfg(), pad_multiple=4, sample_multiple=1, dp_group=None)
    (minibatch,) = batcher.split(samples)
    for group in minibatch.groups():
        group_lengths = [s.tokens.numel() for s in group]
        mb = collate_microbatch(group, layout="packed", pad_multiple=4)
        assert mb.tokens.shape == (1, packed_row_length(group_lengths, 4))
        assert mb.tokens.shape[1] - sum(group_lengths) < 4
        # What the trainer built before: the longest sample times the samples per row.
        assert mb.tokens.shape[1] < max(group_lengths) * len(group) - 4


def test_one_step_shape_is_the_longest_row_not_longest_times_count(single_rank_parallel):
    """Where Megatron needs one shape per step (PP, allgather EP), rows take the step's longest
    packed row, not the longest sample times the samples per row."""
    samples = synthetic_samples(8, vocab_size=40, seed=8, min_length=5, max_length=60)
    batcher = StepBatcher(_train_cfg(), pad_multiple=4, dp_group=None, one_shape=True)
    (minibatch,) = batcher.split(samples)
    rows = [packed_row_length([s.tokens.numel() for s in g], 4) for g in minibatch.groups()]
    assert minibatch.min_lengths == [max(rows)] * len(rows)
    mbs = [collate_microbatch(g, layout="packed", pad_multiple=4, min_length=n)
           for g, n in zip(minibatch.groups(), minibatch.min_lengths)]
    assert {mb.tokens.shape for mb in mbs} == {(1, max(rows))}
    longest = max(s.tokens.numel() for s in samples)
    assert max(rows) < longest * 4


def test_pipeline_rows_take_this_ranks_longest_allgather_ep_the_dp_groups(monkeypatch):
    """One pipeline needs one shape; another DP rank's pipeline is independent, so only the
    allgather dispatcher (equal token counts over DP) pads every rank to the DP group's longest."""
    from sapo_megatron.trainer import batching

    samples = synthetic_samples(8, vocab_size=40, seed=8, min_length=5, max_length=60)
    asked = []
    monkeypatch.setattr(batching, "global_max", lambda value, group: asked.append(group) or 1000)
    (local,) = StepBatcher(_train_cfg(), pad_multiple=4, dp_group="dp", one_shape=True).split(samples)
    assert asked == [] and max(local.min_lengths) < 1000
    (over_dp,) = StepBatcher(_train_cfg(), pad_multiple=4, dp_group="dp", one_shape_over_dp=True).split(samples)
    assert asked == ["dp"] and over_dp.min_lengths == [1000] * len(over_dp.sizes)


@pytest.fixture(scope="module")
def chunks(single_rank_parallel):
    chunks = build_model_chunks(MODEL, ParallelConfig())
    attach_routing_replay(chunks[0], MODEL.moe_layer_pattern())
    return chunks


def _samples():
    # Unequal lengths; one row of five samples, 54 tokens -> 56 with the padding tail.
    samples = synthetic_samples(5, vocab_size=MODEL.vocab_size, seed=11, min_length=4, max_length=19)
    lengths = [s.tokens.numel() for s in samples]
    assert len(set(lengths)) > 2 and sum(lengths) % PAD_MULTIPLE, lengths  # a real tail to pad
    return samples


def _with_routes(samples, seed=0):
    """Forced routes unlike the model's own (distinct experts per token), so replay matters."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        n = s.tokens.numel() - 1
        ids = torch.stack([torch.randperm(MODEL.num_experts, generator=gen)[:2] for _ in range(n * 2)])
        out.append(dataclasses.replace(s, routes=ids.view(n, 2, 2).to(torch.uint8)))
    return out


def _layouts(samples, routes: bool):
    packed = collate_packed(samples, pad_multiple=PAD_MULTIPLE)
    padded = collate_padded(samples, pad_multiple=PAD_MULTIPLE)
    if routes:
        packed, padded = attach_routes(packed, samples), attach_routes(padded, samples)
    return packed, padded


def _grads(chunks, mb, action):
    spec = PolicyLossSpec(tau_pos=1.0, tau_neg=1.05)
    (weighted,) = assign_step_weights([mb], "seq_mean_token_mean")
    with routing_action(chunks, action, with_backward=True):
        metrics = run_step(chunks, [weighted], spec)
    return metrics, {n: p.main_grad.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


@pytest.mark.parametrize("replay", [False, True], ids=["live", "R3"])
def test_packed_row_equals_padded_values_and_gradients(chunks, replay):
    samples = _samples()
    if replay:
        samples = _with_routes(samples)
    packed, padded = _layouts(samples, routes=replay)
    assert packed.tokens.shape == (1, packed_row_length([s.tokens.numel() for s in samples], PAD_MULTIPLE))
    action = "replay" if replay else None
    with routing_action(chunks, action, with_backward=False):
        lp_packed = collect_log_probs(chunks, [packed])
    with routing_action(chunks, action, with_backward=False):
        lp_padded = collect_log_probs(chunks, [padded])
    for a, b in zip(lp_packed, lp_padded):
        # float32: the same sums over other lengths of masked-out keys; ~1e-6 observed.
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())

    m_packed, g_packed = _grads(chunks, packed, action)
    m_padded, g_padded = _grads(chunks, padded, action)
    assert m_packed["loss"] == pytest.approx(m_padded["loss"], rel=1e-5)
    assert m_packed["num_tokens"] == m_padded["num_tokens"]
    nonzero = 0
    for name, ref in g_padded.items():
        err = float((g_packed[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        # float32, only the order of additions differs (as tests/test_dist_step.py).
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
        nonzero += int(ref.norm() > 0)
    # Not vacuous: experts, routers and attention all receive gradient.
    assert nonzero >= len(g_padded) - 2, nonzero


def test_replayed_routes_change_the_packed_row_and_skip_its_padding(chunks):
    """Guards for the R3 parity: replay really forces other routes, and the padding tail is
    neither replayed nor counted (it is not a sample's token)."""
    samples = _with_routes(_samples())
    packed, _ = _layouts(samples, routes=True)
    real = sum(s.tokens.numel() for s in samples)
    pad = packed.routes.pad_mask_SB[:, 0]
    assert pad[real:].all() and not pad[:real].any()
    assert not packed.routes.replay_mask_SB[real:, 0].any()
    with routing_action(chunks, None, with_backward=False):
        live = collect_log_probs(chunks, [packed])
    with routing_action(chunks, "replay", with_backward=False):
        forced = collect_log_probs(chunks, [packed])
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(live, forced))


def test_the_block_mask_is_what_keeps_samples_apart(chunks):
    """Guard: attending across the packed samples (plain causal) changes the log-probs, so the
    parity above is a real check of the per-sample attention."""
    packed, padded = _layouts(_samples(), routes=False)
    seq = packed.tokens.shape[1]
    leaky = dataclasses.replace(packed, attention_mask=~torch.ones(seq, seq, dtype=torch.bool).tril()[None, None])
    with routing_action(chunks, None, with_backward=False):
        good, bad = collect_log_probs(chunks, [packed]), collect_log_probs(chunks, [leaky])
    assert torch.allclose(good[0], bad[0])  # the first sample sees no other
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(good[1:], bad[1:]))


def test_local_spec_mask_is_built_per_microbatch_in_flight(chunks, monkeypatch):
    samples = _samples()
    microbatches = [collate_packed(samples[:2]), collate_padded(samples[2:])]
    assert all(mb.attention_mask is None for mb in microbatches)  # nothing dense is collated
    built = []
    real = step_run.dense_attention_mask

    def spy(mb, device=None):
        mask = real(mb, device)
        built.append((mb.layout, tuple(mask.shape)))
        return mask

    monkeypatch.setattr(step_run, "dense_attention_mask", spy)
    with routing_action(chunks, None, with_backward=False):
        collect_log_probs(chunks, microbatches)
    seq0, seq1 = microbatches[0].tokens.shape[1], microbatches[1].tokens.shape[1]
    assert built == [("packed", (1, 1, seq0, seq0)), ("padded", (1, 1, seq1, seq1))]
    assert all(mb.attention_mask is None for mb in microbatches)


def test_attention_kind_and_packed_rows_without_thd_on_transformer_engine(chunks, monkeypatch):
    """The local spec is recognised (it gets a mask); a chunk without attention gets none; a
    packed row with neither a mask nor THD bounds would attend across samples under TE's causal
    kernel: refused by name."""
    assert step_run.attention_kind(chunks[0]) == "local"
    assert step_run.attention_kind(torch.nn.Linear(1, 1)) is None
    mb = collate_packed(_samples())
    assert step_run._attention_mask(torch.nn.Linear(1, 1), mb) is None
    monkeypatch.setattr(step_run, "attention_kind", lambda model: "te")
    with pytest.raises(ValueError, match="use_thd=True"):
        step_run._attention_mask(chunks[0], mb)
    assert step_run._attention_mask(chunks[0], collate_packed(_samples(), use_thd=True)) is None
    assert step_run._attention_mask(chunks[0], collate_padded(_samples())) is None


def test_bench_batching_packed_padding_is_at_most_two_percent():
    """The Must-show figure (docs/performance.md): on the benchmark's lognormal length mix the
    packed layout pads at most 2%, where the old rows (longest x count) padded about a third."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_batching.py"
    spec = importlib.util.spec_from_file_location("bench_batching", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.packed_padding(bench.parse_args([]))
    assert len(rows) == 3
    for row in rows:
        assert row["fixed"] <= 0.02 and row["budget"] <= 0.02, row
        assert row["old_fixed"] > 0.25, row  # the figure the fix removes (not vacuous)
