"""Worker for tests/test_logprobs.py: vocab_parallel_log_probs and fused_vocab_parallel_log_probs
on real gloo ranks.

Run by the test as ``torchrun --nproc_per_node=4 --standalone tests/dist/logprobs_worker.py --out DIR``.
With 4 ranks it runs every case twice: at TP=4 (the whole world) and at TP=2 (two groups,
ranks {0,1} and {2,3}, so group rank != global rank is exercised too). Each rank takes its
contiguous vocab shard of the same full logits, runs forward + backward, and saves its outputs
and its local gradient shard to DIR/rank{r}.pt; the test compares them with a float64
full-vocab reference. The fused cases (``FUSED_CASES``) give each rank the same hidden states
and its contiguous shard of the output weight; a rank's hidden gradient is its shard's part of
the sum, which the test adds up over the TP group (what Megatron's input mapping does).
Any exception exits non-zero, which fails the test.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.distributed as dist

B, S, VOCAB = 3, 5, 48  # 15 rows; VOCAB divisible by 4
DTYPES = (torch.float32, torch.bfloat16)
TEMPERATURES = (1.0, 0.7)
CHUNKS = (None, 4)  # 4 does not divide the 15 rows
MODES = ("logp", "ent", "both", "logp_of_pair")
CASES = list(itertools.product(DTYPES, TEMPERATURES, CHUNKS, MODES))
HIDDEN = 8
FUSED_CASES = list(itertools.product(DTYPES, TEMPERATURES, CHUNKS, ("logp", "both")))


def make_inputs(case_index: int, dtype: torch.dtype, vocab: int = VOCAB):
    """Full logits [B, S, V], targets [B, S] and upstream gradients, identical on every rank."""
    gen = torch.Generator().manual_seed(1000 + case_index)
    logits = (torch.randn(B, S, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, vocab, (B, S), generator=gen)
    g_logp = torch.randn(B, S, generator=gen)
    g_ent = torch.randn(B, S, generator=gen)
    return logits, targets, g_logp, g_ent


def run_case(logits_shard, targets, g_logp, g_ent, *, mode, temperature, chunk_size, tp_group):
    """Forward + backward of the loss for ``mode``; returns (logp, ent or None, grad of the shard)."""
    from sapo_megatron.logprobs import vocab_parallel_log_probs

    x = logits_shard.clone().requires_grad_()
    if mode == "logp":
        logp = vocab_parallel_log_probs(x, targets, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size)
        ent, loss = None, (logp * g_logp).sum()
    else:
        logp, ent = vocab_parallel_log_probs(x, targets, tp_group=tp_group, temperature=temperature,
                                             with_entropy=True, chunk_size=chunk_size)
        loss = {"ent": (ent * g_ent).sum(), "both": (logp * g_logp + ent * g_ent).sum(),
                "logp_of_pair": (logp * g_logp).sum()}[mode]
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), x.grad


def make_fused_inputs(case_index: int, dtype: torch.dtype, vocab: int = VOCAB):
    """hidden [B, S, H], the full output weight [V, H], targets [B, S] and upstream gradients."""
    gen = torch.Generator().manual_seed(2000 + case_index)
    hidden = torch.randn(B, S, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(vocab, HIDDEN, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, vocab, (B, S), generator=gen)
    g_logp = torch.randn(B, S, generator=gen)
    g_ent = torch.randn(B, S, generator=gen)
    return hidden, weight, targets, g_logp, g_ent


def run_fused_case(hidden, weight_shard, targets, g_logp, g_ent, *, mode, temperature, chunk_size, tp_group):
    """Forward + backward; returns (logp, ent or None, this rank's hidden grad, its weight-shard grad)."""
    from sapo_megatron.logprobs import fused_vocab_parallel_log_probs

    h = hidden.clone().requires_grad_()
    w = weight_shard.clone().requires_grad_()
    kwargs = dict(tp_group=tp_group, temperature=temperature, chunk_size=chunk_size)
    if mode == "logp":
        logp, ent = fused_vocab_parallel_log_probs(h, w, targets, **kwargs), None
        loss = (logp * g_logp).sum()
    else:
        logp, ent = fused_vocab_parallel_log_probs(h, w, targets, with_entropy=True, **kwargs)
        loss = (logp * g_logp + ent * g_ent).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, f"run with 4 ranks, got {world}"
    # new_group is collective: every rank creates both pairs.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layouts = {4: dist.group.WORLD, 2: pairs[rank // 2]}

    results = {}
    for tp, group in layouts.items():
        shard_rank = dist.get_rank(group)
        width = VOCAB // tp
        for i, (dtype, temperature, chunk, mode) in enumerate(CASES):
            logits, targets, g_logp, g_ent = make_inputs(i, dtype)
            shard = logits[..., shard_rank * width:(shard_rank + 1) * width]
            results[(tp, i)] = run_case(shard, targets, g_logp, g_ent, mode=mode, temperature=temperature,
                                        chunk_size=chunk, tp_group=group)
        for i, (dtype, temperature, chunk, mode) in enumerate(FUSED_CASES):
            hidden, weight, targets, g_logp, g_ent = make_fused_inputs(i, dtype)
            shard = weight[shard_rank * width:(shard_rank + 1) * width]
            results[("fused", tp, i)] = run_fused_case(hidden, shard, targets, g_logp, g_ent, mode=mode,
                                                       temperature=temperature, chunk_size=chunk, tp_group=group)
        # A target beyond the global vocab is rejected with the global range, not the local one.
        try:
            from sapo_megatron.logprobs import vocab_parallel_log_probs

            vocab_parallel_log_probs(torch.zeros(2, width), torch.tensor([0, VOCAB]), tp_group=group)
            results[(tp, "error")] = None
        except ValueError as err:
            results[(tp, "error")] = str(err)
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
