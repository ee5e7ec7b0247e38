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

    python benchmarks/bench_batching.py                       # relaunches itself under torchrun
    python benchmarks/bench_batching.py --samples-per-rank 16 --steps 2    # quicker

Last line: ``step_speedup=<x> padding_frac=<y> dp_imbalance=<z>`` (ours; the baseline's are
printed above it).
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
    return ap.parse_args(argv)


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

    prompt = 16
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
        print(f"step_speedup={speedup:.3f} padding_frac={pad:.3f} dp_imbalance={imb:.3f}", flush=True)
    destroy()


def main(argv=None) -> None:
    args = parse_args(argv)
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
