"""Token-budget microbatches vs fixed-count microbatches: one training step's time on 2 DP ranks.

CPU, gloo, DP=2, a tiny MoE, the padded layout (on CPU the packed layout attends through a full
block-diagonal mask, so packing saves no attention compute there). Response lengths are drawn
like real RL responses: lognormal (median ~245 tokens), clipped to 16..2048, on top of a
16-token prompt; rank ``d`` starts with samples ``d::2`` (arrival order).

- baseline: fixed-count microbatches in arrival order, ``micro_batch_size = B / max_len`` so
  that its worst case fits the same memory as the budget;
- ours: ``max_tokens_per_microbatch = B``: Karmarkar-Karp balancing over the DP ranks, then
  packing under B (sorted cut for the padded layout), the exchange of samples included in the
  timed region.

Both compute the same gradient (tests/test_dist_budget.py); steps alternate baseline / ours so
that machine noise hits both alike, and the ratio of their median times is reported.

Packed layout (padding only, not timed: on CPU it attends through a dense mask): the same
samples collated as the trainer collates them (``trainer/batching.py``), fixed-count rows of
``micro_batch_size`` samples and token-budget rows, under three parallel layouts' length
multiples (``step.batch.sequence_multiples``), next to the rows the trainer built before
(longest sample x samples per row). ``--packing-only`` prints just that, in one process.

    python benchmarks/bench_batching.py                       # relaunches itself under torchrun
    python benchmarks/bench_batching.py --samples-per-rank 16 --steps 2    # quicker
    python benchmarks/bench_batching.py --packing-only        # the packed-layout padding, ~1 s

Last line: ``step_speedup=<x> padding_frac=<y> dp_imbalance=<z> packed_padding_frac=<w>`` (ours;
the baseline's are printed above it; ``w`` is the largest packed-layout padding of the table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples-per-rank", type=int, default=32)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each variant (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing-only", action="store_true", help="print the packed-layout padding table only")
    return ap.parse_args(argv)


PROMPT = 16
# (name, tp, sequence_parallel, cp): the length multiples of layouts the configs use.
PARALLEL_LAYOUTS = (("tp1", 1, False, 1), ("tp8_sp", 8, True, 1), ("tp2_sp_cp2", 2, True, 2))


def packed_padding(args, num_ranks: int = 2) -> list[dict]:
    """Padding of the packed layout on the benchmark's samples, per rank as the trainer collates
    them: fixed-count rows (``micro_batch_size`` samples each, arrival order) and token-budget
    rows (first-fit-decreasing under ``--budget``), now and under the old rule."""
    import types

    import torch

    from sapo_megatron.step.batch import Sample, sequence_multiples
    from sapo_megatron.step.budget import pack
    from sapo_megatron.trainer.batching import StepBatcher, collate_microbatch

    lengths = [PROMPT + n for n in lognormal_lengths(args.samples_per_rank * num_ranks, args.max_len - PROMPT, args.seed)]
    micro_batch_size = max(1, args.budget // args.max_len)
    rows = []
    for name, tp, sp, cp in PARALLEL_LAYOUTS:
        multiple, sample_multiple = sequence_multiples(tp_size=tp, sequence_parallel=sp, cp_size=cp)
        counts = {"fixed": [0, 0], "budget": [0, 0], "old_fixed": [0, 0]}
        for rank in range(num_ranks):
            mine = [Sample(tokens=torch.zeros(n, dtype=torch.long), loss_mask=torch.ones(n - 1, dtype=torch.bool),
                           old_log_probs=torch.zeros(n - 1), advantages=torch.zeros(n - 1))
                    for n in lengths[rank::num_ranks]]
            cfg = types.SimpleNamespace(updates_per_rollout=1, micro_batch_size=micro_batch_size,
                                        max_tokens_per_microbatch=None, layout="packed")
            batcher = StepBatcher(cfg, pad_multiple=multiple, sample_multiple=sample_multiple, dp_group=None)
            (minibatch,) = batcher.split(mine)
            budget_groups = [[mine[i] for i in b] for b in pack(
                [s.tokens.numel() for s in mine], args.budget, layout="packed", pad_multiple=multiple,
                sample_multiple=sample_multiple)]
            for key, groups in (("fixed", minibatch.groups()), ("budget", budget_groups)):
                for group in groups:
                    mb = collate_microbatch(group, layout="packed", pad_multiple=multiple,
                                            sample_multiple=sample_multiple)
                    counts[key][0] += int((~mb.padding_mask).sum())
                    counts[key][1] += mb.tokens.numel()
            for group in minibatch.groups():  # the old trainer's row (trainer/loop.py before packing)
                old = max(s.tokens.numel() for s in group) * len(group)
                if cp > 1:
                    old = -(-old // (2 * cp)) * 2 * cp + 2 * cp * len(group)
                counts["old_fixed"][0] += sum(s.tokens.numel() for s in group)
                counts["old_fixed"][1] += -(-old // multiple) * multiple
        rows.append({"layout": name, "multiple": multiple, "sample_multiple": sample_multiple,
                     **{key: 1 - real / total for key, (real, total) in counts.items()}})
    return rows


def print_packed_padding(args, rows) -> float:
    print(f"packed layout padding (samples_per_rank={args.samples_per_rank}, micro_batch_size="
          f"{max(1, args.budget // args.max_len)}, budget={args.budget}):")
    for r in rows:
        print(f"  {r['layout']:<11} multiple={r['multiple']:<2} sample_multiple={r['sample_multiple']}: "
              f"fixed-count rows {r['fixed']:.4f} (old rule {r['old_fixed']:.4f}), token-budget rows {r['budget']:.4f}")
    return max(max(r["fixed"], r["budget"]) for r in rows)


def lognormal_lengths(n: int, max_len: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [min(max_len, max(16, int(rng.lognormvariate(5.5, 1.0)))) for _ in range(n)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from sapo_megatron.models import ModelConfig, ParallelConfig
    from sapo_megatron.parallel import destroy, initialize_model_parallel
    from sapo_megatron.step import PolicyLossSpec, Sample, assign_step_weights, build_model_chunks, collate_padded, run_step
    from sapo_megatron.step.balance import imbalance
    from sapo_megatron.step.plan import plan_minibatch

    torch.set_num_threads(1)
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, seed=1234)
    from megatron.core import parallel_state

    model_cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                            num_experts_per_tok=2, first_k_dense=1, max_position_embeddings=args.max_len + 16)
    chunks = build_model_chunks(model_cfg, parallel)
    group = parallel_state.get_data_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    prompt = PROMPT
    lengths = lognormal_lengths(args.samples_per_rank * size, args.max_len - prompt, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    samples = []
    for n in lengths[rank::size]:
        total = prompt + n
        mask = torch.zeros(total - 1, dtype=torch.bool)
        mask[prompt - 1:] = True
        samples.append(Sample(tokens=torch.randint(0, 64, (total,), generator=gen), loss_mask=mask,
                              old_log_probs=torch.full((total - 1,), -4.0),
                              advantages=torch.full((total - 1,), float(torch.randn((), generator=gen)))))
    spec = PolicyLossSpec(tau_pos=1.0, tau_neg=1.05)
    micro_batch_size = max(1, args.budget // args.max_len)

    def baseline():
        groups = [samples[i:i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]
        return [collate_padded(g) for g in groups], [sum(s.tokens.numel() for s in samples)]

    def ours():
        plan = plan_minibatch(samples, budget=args.budget, layout="padded", group=group)
        return [collate_padded(g) for g in plan.groups], plan.tokens_by_rank

    stats, times = {}, {"baseline": [], "ours": []}
    for step in range(args.steps + 1):
        for name, build in (("baseline", baseline), ("ours", ours)):
            dist.barrier(group)
            t0 = time.perf_counter()
            microbatches, tokens_by_rank = build()
            run_step(chunks, assign_step_weights(microbatches, spec.reduction), spec)
            dist.barrier(group)
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            local = torch.tensor([sum(int((~mb.padding_mask).sum()) for mb in microbatches),
                                  sum(mb.tokens.numel() for mb in microbatches)], dtype=torch.float64)
            parts = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(parts, local, group=group)
            table = torch.stack(parts)
            real, collated = table.sum(0).tolist()
            stats[name] = (1 - real / collated, imbalance(table[:, 0].tolist()), len(microbatches))
    if dist.get_rank() == 0:
        for name in ("baseline", "ours"):
            pad, imb, count = stats[name]
            print(f"{name}: median step {statistics.median(times[name]):.3f}s over {len(times[name])} steps, "
                  f"padding_frac={pad:.3f} dp_imbalance={imb:.3f} microbatches(rank 0)={count}", flush=True)
        speedup = statistics.median(times["baseline"]) / statistics.median(times["ours"])
        pad, imb, _ = stats["ours"]
        print(f"samples_per_rank={args.samples_per_rank} budget={args.budget} baseline_micro_batch_size="
              f"{micro_batch_size} tokens={sum(lengths) + prompt * len(lengths)}")
        packed = print_packed_padding(args, packed_padding(args, size))
        print(f"step_speedup={speedup:.3f} padding_frac={pad:.3f} dp_imbalance={imb:.3f} "
              f"packed_padding_frac={packed:.4f}", flush=True)
    destroy()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.packing_only:
        packed = print_packed_padding(args, packed_padding(args))
        print(f"packed_padding_frac={packed:.4f}", flush=True)
        return
    if "RANK" in os.environ:
        worker(args)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
    sys.exit(subprocess.call(cmd, env=env, cwd=root))


if __name__ == "__main__":
    main()
