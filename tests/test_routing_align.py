"""Route alignment: every layout and shard against a brute-force per-token reference, and the
pipeline stage layers against Megatron-Core's own offset functions."""

import itertools

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from sapo_megatron.step.batch import Sample, collate_packed, collate_padded
from sapo_megatron.models.config import ModelConfig
from sapo_megatron.routing.align import (
    align_packed,
    align_padded,
    cp_slice,
    cp_slice_thd,
    layer_targets,
    moe_slots,
    packed_cu_seqlens,
    sp_slice,
    stage_layer_range,
    stage_moe_layers,
    thd_cp_indices,
)
from tests.helpers import add_fallback_row
from sapo_megatron.routing.compact import (
    compact_routes,
    moe_layer_indices,
    select_moe_layers,
    storage_dtype,
)

M, K, E = 3, 4, 64


def sample_routes(lengths, seed=0):
    """Routes whose ids encode (sample, token, layer) so that misplacement is visible."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        flat = torch.rand((length - 1) * M, E, generator=gen).argsort(dim=1)[:, :K]
        out.append(flat.reshape(length - 1, M, K).to(torch.uint8))
    return out


def token_kind(per_sample, b, t):
    """(routes, replayed, pad) of token t of sample b, by the row convention alone."""
    rows = per_sample[b].shape[0]
    if t < rows:
        return per_sample[b][t], True, False
    if t == rows:
        return torch.arange(K, dtype=torch.uint8).expand(M, K), False, False
    return torch.arange(K, dtype=torch.uint8).expand(M, K), False, True


def test_add_fallback_row():
    routes = sample_routes([6])[0]
    full, replayed = add_fallback_row(routes, num_tokens=6)
    assert full.shape == (6, M, K) and torch.equal(full[:5], routes)
    assert full[5].tolist() == [list(range(K))] * M
    assert replayed.tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match="5 rows for a sample of 7 tokens, expected 6"):
        add_fallback_row(routes, num_tokens=7)


def test_align_padded_of_one_sample_is_its_routes_plus_a_fallback_row():
    """The row convention written out longhand (tests.helpers.add_fallback_row) against the
    shard-direct alignment: a sample of 6 tokens right-padded to 8."""
    routes = sample_routes([6])[0]
    full, replayed = add_fallback_row(routes, num_tokens=6)
    aligned, replay, pad = align_padded([routes], 8, topk=K)
    assert torch.equal(aligned[:6, 0], full) and torch.equal(replay[:6, 0], replayed)
    assert pad[:, 0].tolist() == [False] * 6 + [True] * 2 and not replay[6:, 0].any()


@pytest.mark.parametrize("lengths", [[5], [3, 7, 2], [8, 8], [2, 6, 4, 5]])
@pytest.mark.parametrize("pad_multiple", [1, 4])
def test_align_padded_matches_router_rows(lengths, pad_multiple):
    per_sample = sample_routes(lengths)
    samples = [
        Sample(
            tokens=torch.arange(n),
            loss_mask=torch.ones(n - 1, dtype=torch.bool),
            old_log_probs=torch.zeros(n - 1),
            advantages=torch.zeros(n - 1),
        )
        for n in lengths
    ]
    mb = collate_padded(samples, pad_multiple=pad_multiple)
    batch, seq = mb.tokens.shape
    routes, replay, pad = align_padded(per_sample, seq, topk=K)
    assert routes.shape == (seq, batch, M, K) and routes.dtype == torch.uint8
    # Megatron's router row s * B + b is token (b, s) of the [B, S] microbatch; the tokens of
    # the microbatch (token t of a sample = t here) identify which token each row is.
    for slot in range(M):
        targets = layer_targets(routes, slot)
        assert targets.dtype == torch.int64 and targets.shape == (seq * batch, K)
        for s, b in itertools.product(range(seq), range(batch)):
            row = s * batch + b
            t = s if s < lengths[b] else seq  # token position in sample b (pads beyond)
            assert mb.tokens[b, s] == (s if s < lengths[b] else 0)
            want, want_replay, want_pad = token_kind(per_sample, b, t)
            assert torch.equal(targets[row], want[slot].long()), (s, b, slot)
            assert replay[s, b] == want_replay and pad[s, b] == want_pad
            assert len(set(targets[row].tolist())) == K


@pytest.mark.parametrize("lengths,total", [([5], 5), ([3, 7, 2], 12), ([3, 7, 2], 16), ([4, 4], 10)])
def test_align_packed_matches_collate_packed(lengths, total):
    per_sample = sample_routes(lengths)
    samples = [
        Sample(
            tokens=torch.full((n,), i),
            loss_mask=torch.ones(n - 1, dtype=torch.bool),
            old_log_probs=torch.zeros(n - 1),
            advantages=torch.zeros(n - 1),
        )
        for i, n in enumerate(lengths)
    ]
    mb = collate_packed(samples, min_length=total)
    assert mb.tokens.shape == (1, total)
    routes, replay, pad = align_packed(per_sample, total, topk=K)
    assert routes.shape == (total, 1, M, K)
    for p in range(total):
        b = next((i for i, start in enumerate(mb.sample_index[:, 0].tolist())
                  if start <= p < start + lengths[i]), None)
        if b is None:
            want, want_replay, want_pad = token_kind(per_sample, 0, 10**6)
        else:
            assert mb.tokens[0, p] == b and mb.position_ids[0, p] >= 0
            want, want_replay, want_pad = token_kind(per_sample, b, int(mb.position_ids[0, p]))
        assert torch.equal(routes[p, 0], want), p
        assert replay[p, 0] == want_replay and pad[p, 0] == want_pad


def test_align_packed_sample_multiple_and_errors():
    per_sample = sample_routes([3, 6])
    routes, replay, pad = align_packed(per_sample, 12, topk=K, sample_multiple=4)
    assert packed_cu_seqlens([3, 6], 12, sample_multiple=4).tolist() == [0, 4, 12]
    assert packed_cu_seqlens([3, 6], 16, sample_multiple=4).tolist() == [0, 4, 12, 16]
    assert replay[:, 0].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert pad[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert torch.equal(routes[4:9, 0], per_sample[1])
    with pytest.raises(ValueError, match="take 12 tokens, more than total_length 10"):
        align_packed(per_sample, 10, topk=K, sample_multiple=4)
    with pytest.raises(ValueError, match="sample 1 has 6 tokens .* more than seq_length 5"):
        align_padded(per_sample, 5, topk=K)
    with pytest.raises(ValueError, match=r"sample 0 have shape \(2, 3, 4\), expected \[rows, 3, topk 2\]"):
        align_padded(per_sample, 8, topk=2)


def brute_sp(x, rank, size):
    n = x.shape[0] // size
    return torch.stack([x[i] for i in range(x.shape[0]) if i // n == rank])


def brute_cp(x, rank, size):
    chunk = x.shape[0] // (2 * size)
    return torch.stack([x[i] for i in range(x.shape[0]) if i // chunk in (rank, 2 * size - 1 - rank)])


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_sp_and_cp_slices_vs_brute_force(size):
    x = torch.arange(24 * 2 * M * K).reshape(24, 2, M, K)
    for rank in range(size):
        assert torch.equal(sp_slice(x, rank, size), brute_sp(x, rank, size))
        assert torch.equal(cp_slice(x, rank, size), brute_cp(x, rank, size))
        # seq_dim other than 0: the [B, S] layout of the batch
        assert torch.equal(cp_slice(x.transpose(0, 1), rank, size, seq_dim=1),
                           brute_cp(x, rank, size).transpose(0, 1))
    # every token lands on exactly one rank
    seen = torch.cat([cp_slice(x, r, size) for r in range(size)]).reshape(-1)
    assert sorted(seen.tolist()) == x.reshape(-1).tolist()


def test_cp_slice_matches_megatron(monkeypatch):
    from megatron.core import parallel_state, utils

    tokens = torch.arange(2 * 16).reshape(2, 16)
    routes, _, _ = align_padded(sample_routes([16, 11]), 16, topk=K)
    for size in (2, 4):
        for rank in range(size):
            monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: size)
            monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)
            want = utils.get_batch_on_this_cp_rank({"tokens": tokens.clone()})["tokens"]
            assert torch.equal(cp_slice(tokens, rank, size, seq_dim=1), want)
            # routes ([S, B, ...]) and tokens ([B, S]) are cut the same way
            mine = cp_slice(routes, rank, size)
            for s, b in itertools.product(range(mine.shape[0]), range(2)):
                assert torch.equal(mine[s, b], routes[int(want[b, s]) - 16 * b, b])


def test_slice_errors():
    x = torch.zeros(10, 1)
    with pytest.raises(ValueError, match="10 tokens: the length must be a multiple of the TP size"):
        sp_slice(x, 0, 4)
    # The trainer once asked for TP rank 1 of a whole sequence (tp_size 1) under CP.
    with pytest.raises(ValueError, match=r"shard 1 does not exist: tp_rank must be in \[0, tp_size=1\)"):
        sp_slice(x, 1, 1)
    with pytest.raises(ValueError, match="multiple of 2 x CP = 4"):
        cp_slice(x, 0, 2)
    with pytest.raises(ValueError, match="segment 0 spans 6 tokens, not a multiple of 2 x CP = 4"):
        thd_cp_indices(torch.tensor([0, 6, 10]), 0, 2)
    with pytest.raises(ValueError, match="cu_seqlens_padded ends at 8, the packed row has 10"):
        cp_slice_thd(x, torch.tensor([0, 8]), 0, 2)


def te_thd_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
    """Transformer Engine's thd_partition_indices_kernel, transcribed token by token."""
    cu = [int(v) // world_size for v in cu_seqlens]
    out = []
    for token_id in range(total_tokens // world_size):
        seq_id = max(i for i in range(len(cu) - 1) if cu[i] <= token_id)
        seq_len = cu[seq_id + 1] - cu[seq_id]
        index = token_id - cu[seq_id]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + cu[seq_id] * world_size + seq_len // 2 * offset)
    return out


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_thd_cp_vs_transformer_engine_convention(cp):
    lengths = [5, 2 * cp, 9, 1]
    per_sample = sample_routes(lengths)
    total = sum(-(-n // (2 * cp)) * 2 * cp for n in lengths) + 4 * cp
    cu = packed_cu_seqlens(lengths, total, sample_multiple=2 * cp)
    routes, replay, pad = align_packed(per_sample, total, topk=K, sample_multiple=2 * cp)
    gathered = []
    for rank in range(cp):
        want = te_thd_partitioned_indices(cu, total, cp, rank)
        assert thd_cp_indices(cu, rank, cp).tolist() == want
        assert torch.equal(cp_slice_thd(routes, cu, rank, cp), routes[want])
        assert torch.equal(cp_slice_thd(pad, cu, rank, cp), pad[want])
        gathered += want
    assert sorted(gathered) == list(range(total))


def test_cp_then_sp_order():
    x = torch.arange(16)
    # CP=2 rank 1 keeps chunks 1 and 2 of four: tokens 4..11; TP=2 rank 0 then takes 4..7.
    assert sp_slice(cp_slice(x, 1, 2), 0, 2).tolist() == [4, 5, 6, 7]
    assert sp_slice(cp_slice(x, 0, 2), 1, 2).tolist() == [12, 13, 14, 15]


LAYOUTS = [
    dict(num_layers=8, pp=1),
    dict(num_layers=8, pp=2),
    dict(num_layers=8, pp=4),
    dict(num_layers=8, pp=2, vpp=2),
    dict(num_layers=12, pp=2, vpp=3),
    dict(num_layers=8, pp=4, vpp=2),
    dict(num_layers=10, pp=3, first=2, last=4),
    dict(num_layers=7, pp=2, first=3),
    dict(num_layers=94, pp=4, first=23, last=23),  # Qwen3-235B: 23/24/24/23
    dict(num_layers=5, pp=2, first=2),
    dict(num_layers=5, pp=2, last=4),
    dict(num_layers=7, pp=2, last=2),
    dict(num_layers=9, pp=3, first=1, last=2),
    dict(num_layers=12, pp=3, vpp=2, first=2, last=2),
    dict(num_layers=12, pp=3, vpp=2, first=4),
    dict(num_layers=14, pp=3, vpp=2, last=2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_stage_layers_match_megatron(layout):
    n, pp, vpp = layout["num_layers"], layout["pp"], layout.get("vpp")
    config = TransformerConfig(
        num_layers=n,
        hidden_size=8,
        num_attention_heads=2,
        pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=layout.get("first"),
        num_layers_in_last_pipeline_stage=layout.get("last"),
    )
    pattern = [0, 1, 1, 0, 1][:1] + [1, 0] * n  # dense first layer, then alternating
    pattern = pattern[:n]
    built = []
    for v, p in itertools.product(range(vpp or 1), range(pp)):
        vp_stage = v if vpp else None
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=p)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=p)
        kwargs = dict(pp_size=pp, pp_rank=p, vpp_size=vpp, vp_stage=vp_stage,
                      num_layers_in_first_stage=layout.get("first"),
                      num_layers_in_last_stage=layout.get("last"))
        assert stage_layer_range(n, **kwargs) == range(offset, offset + count)
        moe = stage_moe_layers(pattern, **kwargs)
        assert moe == [i for i in range(offset, offset + count) if pattern[i]]
        built += list(range(offset, offset + count))
    assert sorted(built) == list(range(n))


def test_stage_moe_layers_with_model_config_and_slots():
    cfg = ModelConfig(num_hidden_layers=8, first_k_dense=1, mlp_only_layers=[5])
    pattern = cfg.moe_layer_pattern()
    assert moe_layer_indices(pattern) == [1, 2, 3, 4, 6, 7]
    stage1 = stage_moe_layers(pattern, pp_size=2, pp_rank=1)
    assert stage1 == [4, 6, 7]
    assert moe_slots(pattern, stage1) == [3, 4, 5]
    assert stage_moe_layers(2, num_layers=8, pp_size=2, pp_rank=0) == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[5\] are not MoE layers"):
        moe_slots(pattern, [5])
    with pytest.raises(ValueError, match=r"num_hidden_layers \(8\) is not divisible by pipeline_model_parallel_size \(3\)"):
        stage_layer_range(8, pp_size=3, pp_rank=0)
    with pytest.raises(ValueError, match=r"not all divisible by virtual_pipeline_model_parallel_size \(3\)"):
        stage_layer_range(8, pp_size=2, pp_rank=0, vpp_size=3, vp_stage=0)


def test_compact_storage():
    assert storage_dtype(8) == torch.uint8 and storage_dtype(256) == torch.uint8
    assert storage_dtype(257) == torch.int16 and storage_dtype(32768) == torch.int16
    assert storage_dtype(40000) == torch.int32
    ids = torch.tensor([[[0, 255]]], dtype=torch.int32)
    assert compact_routes(ids, 256).dtype == torch.uint8
    assert compact_routes(torch.tensor([[[300, 1]]]), 512).tolist() == [[[300, 1]]]
    with pytest.raises(ValueError, match=r"ids in \[0, 256\] are outside \[0, num_experts 256\)"):
        compact_routes(torch.tensor([[[0, 256]]]), 256)


def test_select_moe_layers():
    routes = torch.arange(2 * 4 * 2).reshape(2, 4, 2) + 1
    routes[:, [0, 2]] = 0
    assert torch.equal(select_moe_layers(routes, [0, 1, 0, 1]), routes[:, [1, 3]])
    assert torch.equal(select_moe_layers(routes, [0, 1, 0, 1], check_dense_zero=True),
                       routes[:, [1, 3]])
    with pytest.raises(ValueError, match=r"sample 4 has non-zero ids in layers \[1\]"):
        select_moe_layers(routes, [1, 0, 0, 1], check_dense_zero=True, sample_id=4)
    with pytest.raises(ValueError, match="has 3 entries, expected 4"):
        select_moe_layers(routes, [1, 0, 1])
    # Megatron's integer moe_layer_freq: an MoE layer every N layers from layer 0
    assert moe_layer_indices(3, num_layers=7) == [0, 3, 6]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("slots", [None, [1], [0, 2]])
def test_direct_shard_equals_slicing_the_full_layout(layout, tp_size, slots):
    """Building only one SP shard / some layers equals building everything and slicing it."""
    gen = torch.Generator().manual_seed(tp_size)
    per_sample = [torch.randint(0, 200, (n, 3, 2), generator=gen).to(torch.uint8) for n in (5, 1, 9)]
    align = align_padded if layout == "padded" else align_packed
    length = 16 if layout == "padded" else 20
    full = align(per_sample, length, topk=2)
    for rank in range(tp_size):
        got = align(per_sample, length, topk=2, tp_rank=rank, tp_size=tp_size, slots=slots)
        want = [sp_slice(t, rank, tp_size) for t in full]
        if slots is not None:
            want[0] = want[0][:, :, slots]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
