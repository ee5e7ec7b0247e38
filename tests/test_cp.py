"""Context parallelism's data path (the local spec has no CP attention, so no model runs CP here).

Single process: ``cp_shard`` against Megatron's own ``get_batch_on_this_cp_rank`` for every CP
rank (a stand-in group gives it the rank), THD packing padded to 2 x CP, the re-pointed
per-sample view, the route slice, the refusal of CP without Transformer Engine. Under torchrun
(4 gloo ranks, CP=2 x DP=2, ``tests/dist/cp_worker.py``): Megatron's slicing on real CP groups,
the token count over DP x CP, losses and gradients of sapo / gspo / sapo_seq against the full
sequence, and the log-prob pass. SGLang rollouts under CP (4 gloo ranks, TP=2 x CP=2 and CP=2 x
DP=2, ``tests/dist/cp_rollout_worker.py``, the mock server): one leader per TP x PP x CP replica,
the same samples on all its ranks, and the routes each rank's routers replay, TP rank 1 included.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.distributed as dist

from sapo_megatron.config import ConfigError, load_config
from sapo_megatron.config.validate import context_parallel_problems
from sapo_megatron.losses.policy import sequence_log_ratio, sequence_sums_reduced_by
from sapo_megatron.routing.align import cp_slice_thd, sp_slice, thd_cp_indices
from sapo_megatron.routing.microbatch import attach_routes
from sapo_megatron.step.batch import (
    ON_OTHER_CP_RANK,
    collate_packed,
    collate_padded,
    cp_positions,
    cp_shard,
    dense_attention_mask,
    per_sample_view,
    target_counts,
)
from sapo_megatron.step.synthetic import synthetic_samples
from tests.launch import torchrun
from tests.megatron_cp import megatron_cp_slice

WORKER = "tests/dist/cp_worker.py"
ROLLOUT_WORKER = "tests/dist/cp_rollout_worker.py"


def _samples(n=5, seed=0):
    samples = synthetic_samples(n, vocab_size=16, seed=seed, max_length=13, with_ref=True)
    return [dataclasses.replace(s, routes=torch.randint(0, 8, (s.tokens.numel() - 1, 3, 2), dtype=torch.uint8,
                                                        generator=torch.Generator().manual_seed(i)))
            for i, s in enumerate(samples)]


class _Group:
    """What Megatron's get_pg_size / get_pg_rank read from a CP group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_padded_shard_is_megatrons_get_batch_on_this_cp_rank(cp, monkeypatch):
    samples = _samples()
    full = attach_routes(collate_padded(samples, pad_multiple=2 * cp), samples)
    # Microbatches carry no mask; one set by hand is cut as Megatron cuts it (dim 2).
    full = dataclasses.replace(full, attention_mask=dense_attention_mask(full))
    # Megatron reads the CP rank and size from the group: 0.16 through group.rank() / size()
    # (once torch.distributed is initialised), 0.19 through dist.get_rank / get_world_size.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.rank())
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: group.size())
    for rank in range(cp):
        local = cp_shard(full, rank, cp)
        batch = {"tokens": full.tokens, "labels": full.labels, "loss_mask": full.loss_mask,
                 "position_ids": full.position_ids, "attention_mask": full.attention_mask,
                 "padding_mask": full.padding_mask, "routes_BSMK": full.routes.routes_SBMK.transpose(0, 1),
                 **{f"fields.{k}": v for k, v in full.fields.items()}}
        want = megatron_cp_slice(dict(batch), _Group(rank, cp))
        got = {"tokens": local.tokens, "labels": local.labels, "loss_mask": local.loss_mask,
               "position_ids": local.position_ids, "attention_mask": local.attention_mask,
               "padding_mask": local.padding_mask, "routes_BSMK": local.routes.routes_SBMK.transpose(0, 1),
               **{f"fields.{k}": v for k, v in local.fields.items()}}
        for key in batch:
            assert torch.equal(got[key], want[key]), (cp, rank, key)
            assert got[key].shape != batch[key].shape, key  # really cut
        assert local.routes.routes_SBMK.dtype == torch.uint8


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cp", [2, 4])
def test_every_target_lands_on_exactly_one_cp_rank(layout, cp):
    samples = _samples(seed=1)
    if layout == "padded":
        full = collate_padded(samples, pad_multiple=2 * cp)
    else:
        full = collate_packed(samples, use_thd=True, sample_multiple=2 * cp)
    full = attach_routes(full, samples)
    reference = {name: per_sample_view(v, full.sample_index) for name, v in full.fields.items()}
    reference_mask = per_sample_view(full.loss_mask, full.sample_index, fill=False)
    owners = torch.zeros(full.sample_index.shape, dtype=torch.long)
    assembled = {name: torch.zeros_like(v) for name, v in reference.items()}
    for rank in range(cp):
        local = cp_shard(full, rank, cp)
        assert torch.equal(target_counts(local.sample_index), target_counts(full.sample_index))
        here = local.sample_index >= 0
        owners += here
        for name, value in local.fields.items():
            assembled[name] += per_sample_view(value, local.sample_index)
        assert torch.equal(per_sample_view(local.loss_mask, local.sample_index, fill=False), reference_mask & here)
        # Routes: the same positions, compact.
        keep = cp_positions(full, rank, cp)
        assert torch.equal(local.routes.routes_SBMK, full.routes.routes_SBMK.index_select(0, keep))
        assert torch.equal(local.routes.replay_mask_SB, full.routes.replay_mask_SB.index_select(0, keep))
        assert ((local.sample_index == ON_OTHER_CP_RANK).any()), rank  # the view really spans ranks
    valid = full.sample_index >= 0
    assert torch.equal(owners, valid.long())
    for name in reference:
        assert torch.equal(assembled[name], reference[name]), name


def test_thd_packing_pads_each_sample_to_2cp_and_names_true_and_padded_bounds():
    samples = _samples(seed=2)
    lengths = [s.tokens.numel() for s in samples]
    mb = collate_packed(samples, use_thd=True, sample_multiple=4, pad_multiple=8)
    params = mb.packed_seq_params
    padded = params.cu_seqlens_q_padded.tolist()
    spans = [b - a for a, b in zip(padded[:-1], padded[1:])]
    assert all(span % 4 == 0 for span in spans) and padded[-1] == mb.tokens.shape[1] and padded[-1] % 8 == 0
    true = params.cu_seqlens_q.tolist()
    assert [b - a for a, b in zip(true[:-1], true[1:])][: len(lengths)] == lengths
    assert params.max_seqlen_q == max(spans)
    # Each sample starts its padded segment; padding carries no loss and is marked.
    for i, s in enumerate(samples):
        start = padded[i]
        assert torch.equal(mb.tokens[0, start : start + lengths[i]], s.tokens)
        assert not mb.loss_mask[0, start + lengths[i] - 1 : padded[i + 1]].any()
        assert mb.padding_mask[0, start + lengths[i] : padded[i + 1]].all()
    # THD slicing of the routes reuses routing.align's TE-convention indices.
    mb = attach_routes(mb, samples)
    local = cp_shard(mb, 1, 2)
    assert torch.equal(local.routes.routes_SBMK, cp_slice_thd(mb.routes.routes_SBMK, params.cu_seqlens_q_padded, 1, 2))
    assert torch.equal(local.tokens[0], mb.tokens[0, thd_cp_indices(params.cu_seqlens_q_padded, 1, 2)])


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("cp", [2, 4])
def test_each_cp_and_sp_rank_replays_its_own_tokens_rows(cp, tp):
    """Routes attached for the whole sequence (as the trainer attaches them under CP, on every TP
    rank), then the CP slice, then replay's SP shard: the token at original position ``p`` of
    sample ``b`` gets row ``p`` of that sample's routes, on exactly one (CP, TP) rank."""
    samples = _samples(seed=5)
    full = attach_routes(collate_padded(samples, pad_multiple=2 * cp * tp), samples, tp_rank=0, tp_size=1)
    seen = torch.zeros(full.tokens.shape, dtype=torch.long)
    for cp_rank, tp_rank in itertools.product(range(cp), range(tp)):
        local = cp_shard(full, cp_rank, cp)
        routes = local.routes
        routes_SBMK, replay_SB = (sp_slice(t, tp_rank, tp) for t in (routes.routes_SBMK, routes.replay_mask_SB))
        positions_SB = sp_slice(local.position_ids.T, tp_rank, tp)
        for (s, b), p in zip(itertools.product(*map(range, positions_SB.shape)), positions_SB.reshape(-1).tolist()):
            rows = samples[b].routes.shape[0]
            assert bool(replay_SB[s, b]) == (p < rows), (cp_rank, tp_rank, s, b)
            if p < rows:
                assert torch.equal(routes_SBMK[s, b], samples[b].routes[p])
            seen[b, p] += 1
    assert (seen == 1).all()


def test_packed_cp_needs_padded_thd_bounds():
    samples = _samples(seed=3)
    with pytest.raises(ValueError, match="cu_seqlens_q_padded"):
        cp_shard(collate_packed(samples), 0, 2)


def test_routes_aligned_to_an_sp_shard_are_refused_under_cp():
    samples = _samples(seed=4)
    mb = attach_routes(collate_padded(samples, pad_multiple=8), samples, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="attach them for the whole sequence"):
        cp_shard(mb, 0, 2)


def test_sequence_sums_hook_is_exact_identity_without_cp_and_changes_the_ratio_with_it():
    gen = torch.Generator().manual_seed(0)
    lp, old = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    plain = sequence_log_ratio(lp, old, mask, 20.0)
    with sequence_sums_reduced_by(lambda sums: sums):
        assert torch.equal(sequence_log_ratio(lp, old, mask, 20.0), plain)
    # A reducer that doubles the sums of log r but not the counts doubles the sequence mean.
    with sequence_sums_reduced_by(lambda sums: sums * torch.tensor([[2.0], [1.0]])):
        doubled = sequence_log_ratio(lp, old, mask, 20.0)
    seq_mean = torch.where(mask, lp - old, 0).sum(1) / mask.sum(1)
    assert torch.allclose(doubled - plain, seq_mean[:, None], atol=1e-6)


def test_cp_without_transformer_engine_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["parallel.context_parallel_size=2"])
    message = str(err.value)
    assert "parallel.context_parallel_size=2 needs Transformer Engine" in message
    assert "DotProductAttention asserts context_parallel_size == 1" in message


def test_cp_with_transformer_engine_refuses_only_what_cp_cannot_do():
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.urls=[http://h:30000]"])
    cfg.parallel.context_parallel_size = 2
    assert context_parallel_problems(cfg, transformer_engine=True) == []
    cfg.routing.mode = "R2"
    cfg.rollout.engine = "embedded"
    problems = context_parallel_problems(cfg, transformer_engine=True)
    assert any("routing.mode=R2" in p for p in problems) and any("rollout.engine=embedded" in p for p in problems)
    cfg.parallel.context_parallel_size = 1
    assert context_parallel_problems(cfg, transformer_engine=False) == []


@pytest.mark.dist
@pytest.mark.slow
def test_cp_data_path_on_gloo_ranks(tmp_path):
    out = tmp_path / "cp.json"
    torchrun(WORKER, "--cp", "2", "--out", out, nproc=4, timeout=600)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 4
    for checks in ranks:
        assert {"attention_mask", "tokens", "labels", "routes", "replay"} <= set(checks["megatron_slicing"])
        for loss in ("sapo", "gspo", "sapo_seq"):
            assert f"loss_{loss}" in checks
        assert checks["log_probs_rows"] == 4
    # All agree on the step's token count; the two CP ranks of a DP rank check the same full
    # loss, the two DP ranks hold different samples (Megatron's rank order tp-cp-ep-dp-pp).
    assert len({c["step_num_tokens"] for c in ranks}) == 1
    assert len({c["loss_sapo"] for c in ranks}) == 2


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_cp2", "cp2_dp2"])
def test_cp_ranks_of_a_replica_share_one_leaders_samples_and_slice_its_routes(layout, tmp_path, monkeypatch):
    from tests import sglang_mock
    from tests.dist.cp_rollout_worker import MOE_LAYERS, PROMPTS

    # SGLang without --enable-deterministic-inference ignores sampling_seed: two requests for the
    # same prompt and seed get other tokens. A nonce per request makes the mock do the same, so
    # two leaders in one replica would hand its CP ranks different samples.
    nonce, original = itertools.count(), sglang_mock.fake_generate

    def sample_anew(request, b, *args, **kwargs):
        sampling = {**request.get("sampling_params", {}), "sampling_seed": next(nonce)}
        return original({**request, "sampling_params": sampling}, b, *args, **kwargs)

    monkeypatch.setattr(sglang_mock, "fake_generate", sample_anew)
    out = tmp_path / "cp_rollout.json"
    args = {"tp2_cp2": ["--tp", "2", "--cp", "2"], "cp2_dp2": ["--cp", "2"]}[layout]
    with sglang_mock.MockSGLang(sglang_mock.Behaviour(num_hidden_layers=3, dense_layers=(0,), topk=2,
                                                      num_experts=4, vocab_size=16)) as server:
        torchrun(ROLLOUT_WORKER, *args, "--url", server.url, "--out", out, nproc=4, timeout=300)
        generates = server.bodies("/generate")
    ranks = json.loads(out.read_text())
    replicas = {}
    for r in ranks:
        replicas.setdefault(r["dp_rank"], []).append(r)
    assert len(replicas) == (1 if layout == "tp2_cp2" else 2)
    for dp_rank, members in replicas.items():
        # One group per replica (TP x PP x CP), one leader in it, every member holding its samples.
        assert all(sorted(m["group"]) == sorted(x["rank"] for x in members) for m in members), members
        assert sum(m["leader"] for m in members) == 1
        assert len({m["cp_rank"] for m in members}) == 2
        assert all(m["tokens"] == members[0]["tokens"] and m["routes"] == members[0]["routes"] for m in members)
        prompts = [p for p in PROMPTS[dp_rank] for _ in range(2)]
        assert [t[: len(p)] for t, p in zip(members[0]["tokens"], prompts, strict=True)] == prompts
        # Each routed row is replayed on exactly one rank of its replica, in each MoE layer: the
        # CP and SP shards partition the tokens (the worker checked each row against the truth).
        routed = sum(len(rows) for rows in members[0]["routes"])
        assert sum(m["replayed_rows"] for m in members) == len(MOE_LAYERS) * routed
    # One request per sample per replica: a second leader would have doubled them. Not vacuous:
    # the nonce makes two requests for one prompt differ (the two samples of a prompt; both
    # stopping at once on their first token, 1 in 256 per pair, is the only way they agree).
    assert len(generates) == sum(2 * len(PROMPTS[d]) for d in replicas)
    tokens = ranks[0]["tokens"]
    assert any(tokens[i] != tokens[i + 1] for i in range(0, len(tokens), 2))
