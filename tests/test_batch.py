"""Collation (padded / packed), the per-sample view, and step-global weights (pure, one process)."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.losses import reduction_weights
from sapo_megatron.step.batch import (
    Sample,
    collate_packed,
    collate_padded,
    dense_attention_mask,
    packed_row_length,
    per_sample_view,
    sequence_multiples,
    split_step_samples,
)
from sapo_megatron.step.run import assign_step_weights


def _sample(tokens, mask, adv=1.0):
    tokens = torch.tensor(tokens)
    n = tokens.numel() - 1
    return Sample(
        tokens=tokens,
        loss_mask=torch.tensor(mask, dtype=torch.bool),
        old_log_probs=-torch.arange(1, n + 1, dtype=torch.float32),
        advantages=torch.full((n,), adv),
    )


SAMPLES = [_sample([5, 6, 7, 8], [0, 1, 1]), _sample([9, 10], [1], adv=-1.0), _sample([1, 2, 3], [1, 1])]


def test_padded_alignment():
    mb = collate_padded(SAMPLES, pad_multiple=4)
    assert mb.tokens.shape == (3, 4)
    assert mb.labels[0].tolist() == [6, 7, 8, 0]
    assert mb.loss_mask[0].tolist() == [False, True, True, False]
    assert mb.loss_mask[1].tolist() == [True, False, False, False]
    assert mb.fields["old_log_probs"][0, :3].tolist() == [-1, -2, -3]
    assert mb.sample_index.tolist() == [[0, 1, 2], [4, -1, -1], [8, 9, -1]]
    # No dense mask is stored; the local spec's one is causal: position t never sees t+1.
    assert mb.attention_mask is None
    mask = dense_attention_mask(mb)
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, 0, 1] and not mask[0, 0, 1, 0]


def test_packed_alignment_and_block_mask():
    mb = collate_packed(SAMPLES, pad_multiple=4)
    assert mb.tokens.shape == (1, 12)
    assert mb.tokens[0, :9].tolist() == [5, 6, 7, 8, 9, 10, 1, 2, 3]
    # No target crosses a sample boundary.
    assert mb.labels[0, :9].tolist() == [6, 7, 8, 0, 10, 0, 2, 3, 0]
    assert mb.loss_mask[0, :9].tolist() == [False, True, True, False, True, False, True, True, False]
    assert mb.position_ids[0, :9].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert mb.attention_mask is None
    blocked = dense_attention_mask(mb)[0, 0]
    assert not blocked[3, 0] and blocked[4, 3] and not blocked[5, 4] and blocked[0, 1]
    assert blocked[9:, :9].all(), "padding must not attend into samples"
    assert blocked[:9, 9:].all(), "no real token may attend to padding"
    assert not blocked[9:, 9:].diagonal().any() and blocked[10, 9], "padding attends only to itself"
    assert mb.sample_index.tolist() == [[0, 1, 2], [4, -1, -1], [6, 7, -1]]
    # The row's padding belongs to the last sample's padded segment, not a segment of its own.
    assert mb.cu_seqlens_padded.tolist() == [0, 4, 6, 12]


def test_per_sample_view_is_layout_independent():
    padded, packed = collate_padded(SAMPLES), collate_packed(SAMPLES)
    for name in ("old_log_probs", "advantages"):
        a = per_sample_view(padded.fields[name], padded.sample_index)
        b = per_sample_view(packed.fields[name], packed.sample_index)
        assert torch.equal(a, b)
    assert torch.equal(
        per_sample_view(padded.loss_mask, padded.sample_index, fill=False),
        per_sample_view(packed.loss_mask, packed.sample_index, fill=False),
    )


def test_thd_params():
    mb = collate_packed(SAMPLES, pad_multiple=4, use_thd=True)
    params = mb.packed_seq_params
    # True bounds for attention; the 3 padding tokens sit in the last sample's padded segment,
    # which Transformer Engine skips (no segment of padding that attends or routes).
    assert params.cu_seqlens_q.tolist() == [0, 4, 6, 9]
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 6, 12]
    assert params.max_seqlen_q == 6
    assert mb.attention_mask is None
    # Nothing to pad: no padded bounds (Transformer Engine then needs no padding support).
    exact = collate_packed(SAMPLES[:2], pad_multiple=2, use_thd=True).packed_seq_params
    assert exact.cu_seqlens_q.tolist() == [0, 4, 6] and exact.cu_seqlens_q_padded is None


def test_sequence_multiples_follow_upstream():
    # megatron.core.models.multimodal.context_parallel.get_padding: SP -> TP, CP -> 2 CP,
    # both -> 2 CP TP; TP without SP needs nothing.
    assert sequence_multiples() == (1, 1)
    assert sequence_multiples(tp_size=4, sequence_parallel=True) == (4, 1)
    assert sequence_multiples(tp_size=4, sequence_parallel=False) == (1, 1)
    assert sequence_multiples(cp_size=2) == (4, 4)
    assert sequence_multiples(tp_size=2, sequence_parallel=True, cp_size=3) == (12, 6)


@pytest.mark.parametrize("multiple, sample_multiple", [(1, 1), (4, 1), (8, 4), (12, 6)])
def test_packed_row_is_the_sum_of_lengths_rounded_up(multiple, sample_multiple):
    """The old trainer packed to longest x count (a row of 4 samples of up to 8k tokens padded
    to ~34k); a packed row now holds the sum of its samples' lengths, rounded up only as far as
    the parallel layout needs."""
    gen = torch.Generator().manual_seed(multiple)
    samples = [_sample(torch.randint(0, 9, (int(n),)).tolist(), [1] * (int(n) - 1))
               for n in torch.randint(2, 40, (5,), generator=gen)]
    lengths = [s.tokens.numel() for s in samples]
    mb = collate_packed(samples, pad_multiple=multiple, sample_multiple=sample_multiple, use_thd=True)
    row = mb.tokens.shape[1]
    assert row == packed_row_length(lengths, multiple, sample_multiple=sample_multiple)
    assert row % multiple == 0 and row >= sum(lengths)
    # Padding: under one sample_multiple per sample, plus under one multiple for the row.
    assert row - sum(lengths) < len(lengths) * sample_multiple + multiple
    assert row < max(lengths) * len(lengths), "the old rule (longest x count) is back"
    assert int((~mb.padding_mask).sum()) == sum(lengths)
    assert mb.cu_seqlens_padded[-1] == row and len(mb.cu_seqlens_padded) == len(lengths) + 1
    bounds = mb.cu_seqlens_padded.tolist()
    assert all((b - a) % sample_multiple == 0 for a, b in zip(bounds[:-1], bounds[1:]))


def test_packed_row_length_by_hand():
    assert packed_row_length([5, 3, 9]) == 17
    assert packed_row_length([5, 3, 9], 4) == 20
    assert packed_row_length([5, 3, 9], 8, sample_multiple=4) == 24  # 8 + 4 + 12 = 24
    assert packed_row_length([], 4) == 0
    # A row multiple that is not one of sample_multiple (sequence_multiples never gives one):
    # the tail joins the last segment, which must stay a multiple of 4.
    assert packed_row_length([3, 6], 2, sample_multiple=4) == 12
    mb = collate_packed(SAMPLES, sample_multiple=4, pad_multiple=2, min_length=13)
    assert mb.cu_seqlens_padded.tolist() == [0, 4, 8, 16]
    with pytest.raises(ValueError, match="multiples must be >= 1"):
        packed_row_length([3], 0)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_step_weights_do_not_depend_on_the_split(reduction):
    """Weights of each token are the same whether the step is one microbatch or three."""
    whole = assign_step_weights([collate_padded(SAMPLES)], reduction, norm_length=5)[0]
    parts = assign_step_weights([collate_packed([s]) for s in SAMPLES], reduction, norm_length=5)
    expected = reduction_weights(per_sample_view(whole.loss_mask, whole.sample_index, fill=False), reduction, norm_length=5)
    assert torch.allclose(whole.token_weights, expected)
    for i, part in enumerate(parts):
        n = int((part.sample_index >= 0).sum())
        assert torch.allclose(part.token_weights[0, :n], whole.token_weights[i, :n])
    assert all(p.step_num_tokens == 5 for p in parts)
    if reduction in ("token_mean", "seq_mean_token_mean"):
        total = sum(float(p.token_weights.sum()) for p in parts)
        assert total == pytest.approx(1.0)


def test_split_and_errors():
    samples = SAMPLES * 4
    groups = split_step_samples(samples, dp_rank=1, dp_size=2, num_microbatches=3)
    assert [len(g) for g in groups] == [2, 2, 2] and groups[0][0] is samples[6]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        split_step_samples(samples, dp_rank=0, dp_size=5, num_microbatches=1)
    with pytest.raises(ValueError, match=r"Sample.loss_mask has shape \(2,\), expected \(3,\)"):
        Sample(tokens=torch.arange(4), loss_mask=torch.ones(2, dtype=torch.bool),
               old_log_probs=torch.zeros(3), advantages=torch.zeros(3))
    bad = [SAMPLES[0], Sample(**{**SAMPLES[1].__dict__, "ref_log_probs": torch.zeros(1)})]
    with pytest.raises(ValueError, match="lack 'ref_log_probs'"):
        collate_padded(bad)


def test_global_names_for_both_expert_layouts(monkeypatch):
    """PP layer offsets and EP expert offsets; grouped-GEMM names map to SequentialMLP names."""
    import types

    from megatron.core import parallel_state

    from sapo_megatron.step.sharding import global_name

    experts = types.SimpleNamespace(num_local_experts=4, local_experts=[None] * 4)
    layer = types.SimpleNamespace(layer_number=7, mlp=types.SimpleNamespace(experts=experts))
    model = types.SimpleNamespace(decoder=types.SimpleNamespace(layers=[layer]))
    monkeypatch.setattr(parallel_state, "get_expert_model_parallel_rank", lambda: 2)
    assert global_name(model, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight") == \
        "decoder.layers.6.mlp.experts.local_experts.9.linear_fc2.weight"
    assert global_name(model, "decoder.layers.0.mlp.experts.linear_fc1.weight3") == \
        "decoder.layers.6.mlp.experts.local_experts.11.linear_fc1.weight"
    assert global_name(model, "decoder.layers.0.mlp.router.weight") == "decoder.layers.6.mlp.router.weight"
    assert global_name(model, "output_layer.weight") == "output_layer.weight"


def test_te_fused_norm_names_map_to_the_local_spec():
    """TE fuses the pre-attention and dense pre-MLP norms into the next linear layer; our
    canonical (local-spec) names are restored, and no other name is touched."""
    from sapo_megatron.mcore.te_names import local_norm_name

    assert local_norm_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert local_norm_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    for name in ("decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.final_layernorm.weight"):
        assert local_norm_name(name) == name
