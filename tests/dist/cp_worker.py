"""Context parallelism's data path on real gloo ranks, against Megatron's own slicing.

Run by tests/test_cp.py: ``torchrun --nproc_per_node=4 tests/dist/cp_worker.py --cp 2 --out F``
(CP=2 x DP=2). No model runs (the local spec has no CP attention); the model's output is
stood in for by fixed logits, cut the way a CP model's output is cut. Checks, per rank:

1. ``prepare_microbatch`` gives exactly what ``megatron.core.utils.get_batch_on_this_cp_rank``
   gives for every per-token tensor (this rank's CP group), and replayed
   routes get the same slice;
2. the step's token count: the local CP shards' counts sum, over DP x CP (what
   ``finalize_model_grads`` all-reduces), to ``step_num_tokens``;
3. for sapo, gspo and sapo_seq: the CP shards' losses and logits gradients, summed over CP,
   equal the full-sequence loss and gradient on one rank (float64); without the sequence-sum
   all-reduce gspo / sapo_seq would not (the guard);
4. the log-prob pass reassembles every target's log-prob over CP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state

    from sapo_megatron.losses import compute_policy_loss, policy as policy_mod
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import destroy, initialize_model_parallel
    from sapo_megatron.routing.microbatch import attach_routes
    from sapo_megatron.step import run as step_run
    from sapo_megatron.logprobs import vocab_parallel_log_probs
    from sapo_megatron.step.batch import collate_padded, cp_positions, dense_attention_mask, per_sample_view
    from sapo_megatron.step.run import PolicyLossSpec, assign_step_weights, loss_func, prepare_microbatch
    from sapo_megatron.step.synthetic import synthetic_samples
    from tests.megatron_cp import megatron_cp_slice

    initialize_model_parallel(ParallelConfig(context_parallel_size=args.cp), seed=0)
    cp, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_group = parallel_state.get_context_parallel_group()
    assert cp == args.cp
    vocab, checks = 16, {}

    # DP ranks hold different samples; the CP ranks of one DP rank the same ones.
    samples = synthetic_samples(4, vocab_size=vocab, seed=10 + dp_rank, max_length=13, with_ref=True)
    samples = [dataclasses.replace(s, routes=torch.randint(0, 6, (s.tokens.numel() - 1, 2, 2),
                                                           generator=torch.Generator().manual_seed(i), dtype=torch.uint8))
               for i, s in enumerate(samples)]
    full = collate_padded(samples, pad_multiple=2 * cp)
    # Microbatches carry no mask; one set by hand is cut as Megatron cuts it (dim 2).
    full = dataclasses.replace(full, attention_mask=dense_attention_mask(full))
    full = attach_routes(full, samples)  # whole sequence (tp_size=1): CP slices first
    full = assign_step_weights([full], "seq_mean_token_mean")[0]
    # The policy's output for this step, and old log-probs near it (ratios near 1, so that the
    # clip losses keep their gradients): fixed logits stand in for a CP model's output.
    gen = torch.Generator().manual_seed(100 + dp_rank)
    logits_full = torch.randn(*full.tokens.shape, vocab, generator=gen)
    old = vocab_parallel_log_probs(logits_full, full.labels) + 0.1 * torch.randn(full.tokens.shape, generator=gen)
    full = dataclasses.replace(full, fields={**full.fields, "old_log_probs": old.detach()})
    model = types.SimpleNamespace(parameters=lambda: iter([torch.empty(0)]), buffers=lambda: iter([]))
    local = prepare_microbatch(full, model)

    # 1. Megatron's slicing of the same tensors (it slices dim 1, dim 2 of the attention mask).
    batch = {"tokens": full.tokens, "labels": full.labels, "loss_mask": full.loss_mask,
             "position_ids": full.position_ids, "attention_mask": full.attention_mask.expand(4, -1, -1, -1),
             "padding_mask": full.padding_mask, **{f"f.{k}": v for k, v in full.fields.items()},
             # Routes in [B, S, ...] order, so that Megatron's dim-1 slicing applies to them.
             "routes": full.routes.routes_SBMK.transpose(0, 1), "replay": full.routes.replay_mask_SB.T}
    reference = megatron_cp_slice({k: v.clone() for k, v in batch.items()}, cp_group)
    ours = {"tokens": local.tokens, "labels": local.labels, "loss_mask": local.loss_mask,
            "position_ids": local.position_ids, "attention_mask": local.attention_mask.expand(4, -1, -1, -1),
            "padding_mask": local.padding_mask, **{f"f.{k}": v for k, v in local.fields.items()},
            "routes": local.routes.routes_SBMK.transpose(0, 1), "replay": local.routes.replay_mask_SB.T}
    for key in batch:
        assert torch.equal(ours[key], reference[key]), key
        assert reference[key].shape != batch[key].shape or cp == 1, key  # really sliced
    assert local.routes.routes_SBMK.dtype == torch.uint8  # still compact
    checks["megatron_slicing"] = sorted(batch)

    # 2. Tokens over DP x CP.
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    local_tokens = torch.tensor([float(local.loss_mask.sum())])
    dist.all_reduce(local_tokens, group=dp_cp)
    full_tokens_dp = torch.tensor([float(full.loss_mask.sum())])
    dist.all_reduce(full_tokens_dp, group=parallel_state.get_data_parallel_group())
    assert int(local_tokens) == full.step_num_tokens == int(full_tokens_dp), (local_tokens, full.step_num_tokens)
    checks["step_num_tokens"] = full.step_num_tokens

    # 3. Losses and gradients: CP shards vs the full sequence on one rank (the same float32
    # log-prob kernel, itself tested against float64 in test_logprobs.py).
    keep = cp_positions(full, cp_rank, cp)
    for loss_type in ("sapo", "gspo", "sapo_seq"):
        spec = config = PolicyLossSpec(type=loss_type, tau_pos=1.0, tau_neg=1.05)
        # Reference: the whole sequence on this rank, no CP anywhere.
        leaf = logits_full.clone().requires_grad_()
        lp = vocab_parallel_log_probs(leaf, full.labels)
        view = lambda t, fill=0: per_sample_view(t, full.sample_index, fill=fill)  # noqa: E731
        ref_loss, _ = compute_policy_loss(loss_type, view(lp), view(full.fields["old_log_probs"]),
                                          view(full.fields["advantages"]), view(full.loss_mask, fill=False),
                                          config=config, token_weights=full.token_weights)
        ref_loss.backward()
        ref_grad = leaf.grad
        # CP: each rank's share of the logits, as a CP model's output would be.
        leaf = logits_full.clone().requires_grad_()
        scaled, n_local, reported = loss_func(local, spec, leaf.index_select(1, keep))
        sequences = torch.tensor([float(reported["num_sequences"])])
        dist.all_reduce(sequences, group=cp_group)
        want = int(per_sample_view(full.loss_mask, full.sample_index, fill=False).any(1).sum())
        assert abs(float(sequences) - want) < 1e-9, (float(sequences), want)  # counted once
        (scaled / full.step_num_tokens).backward()
        loss_sum = torch.tensor([float(scaled.detach()) / full.step_num_tokens])
        dist.all_reduce(loss_sum, group=cp_group)
        grad = leaf.grad.clone()
        dist.all_reduce(grad, group=cp_group)
        # float32, the same terms summed in another order (two CP partial sums): values O(1)
        # over ~40 tokens, so 1e-6 is ~20 ulp of the loss; gradients entries are < 1.
        assert abs(float(loss_sum) - float(ref_loss)) < 1e-6, (loss_type, float(loss_sum), float(ref_loss))
        assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=0), (loss_type, (grad - ref_grad).abs().max())
        assert ref_grad.abs().max() > 1e-4  # gradients are not trivially zero
        checks[f"loss_{loss_type}"] = float(ref_loss)
        if loss_type != "sapo":
            # Guard: without the CP all-reduce of sequence sums, a sequence-level ratio is wrong.
            original = step_run._sequence_sums_over_context_parallel
            step_run._sequence_sums_over_context_parallel = lambda: policy_mod.sequence_sums_reduced_by(lambda t: t)
            try:
                leaf = logits_full.clone().requires_grad_()
                scaled, _, _ = loss_func(local, spec, leaf.index_select(1, keep))
                (scaled / full.step_num_tokens).backward()
            finally:
                step_run._sequence_sums_over_context_parallel = original
            wrong = leaf.grad.clone()
            dist.all_reduce(wrong, group=cp_group)
            gap = float((wrong - ref_grad).abs().max())
            assert gap > 1e-6, (loss_type, gap)
            checks[f"without_cp_sums_gap_{loss_type}"] = gap

    # 4. The log-prob pass: every target's log-prob, reassembled over CP.
    _, _, out = step_run._log_prob_loss_func(local, 1.0, None, logits_full.index_select(1, keep))
    lp_full = torch.log_softmax(logits_full.double(), -1).gather(-1, full.labels[..., None])[..., 0]
    lengths = (full.sample_index >= 0).sum(1).tolist()
    expected = [per_sample_view(lp_full, full.sample_index)[i, :n] for i, n in enumerate(lengths)]
    for got, want in zip(out["log_probs"], expected):
        # float32 log-softmax of the same logits against float64: 1e-5 absolute.
        assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    checks["log_probs_rows"] = len(expected)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checks)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    destroy()


if __name__ == "__main__":
    main()
