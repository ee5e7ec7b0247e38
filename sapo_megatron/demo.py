"""One real SAPO policy update of a tiny MoE GPTModel under torchrun (the CPU smoke run).

What happens, per rank: Megatron-Core's parallel groups are created (TP=2 with sequence
parallelism by default on 2 ranks), the tiny Qwen3-MoE-shaped model is built and wrapped in
Megatron's DDP, a synthetic rollout batch is scored by a forward-only pass to get the
old-policy log-probs, and then several SAPO minibatch updates run through
``get_forward_backward_func()`` with the Adam optimizer. Rank 0 prints each update's metrics.
The ratios start at exactly 1 and move away from it as the policy changes.

Run it through the CLI, which starts torchrun for you::

    sapo-megatron demo                      # 2 gloo ranks, TP=2 (+SP)
    sapo-megatron demo --nproc 2 --ep 2     # expert parallelism instead

or directly: ``torchrun --nproc_per_node=2 -m sapo_megatron.demo --tp 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

EPILOG = """examples:
  sapo-megatron demo                      # 2 gloo ranks, TP=2 (+SP), 4 SAPO updates
  sapo-megatron demo --nproc 2 --ep 2     # expert parallelism instead
  sapo-megatron demo --loss grpo --updates 8

Starts torchrun itself (--nproc ranks) unless already running under it. Rank 0 prints one JSON
line of metrics per update; the ratios start at 1 and move as the policy changes."""


def build_parser(prog: str = "sapo-megatron demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks to start (CLI only)")
    ap.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: nproc)")
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--updates", type=int, default=4, help="minibatch updates on one rollout batch")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--loss", default="sapo")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sapo_megatron.step import (
        PolicyLossSpec,
        assign_step_weights,
        build_model_chunks,
        build_optimizer,
        collate_padded,
        collect_log_probs,
        run_step,
    )
    from sapo_megatron.step.batch import split_step_samples
    from sapo_megatron.step.synthetic import synthetic_samples
    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.parallel import destroy, init_distributed, initialize_model_parallel

    init_distributed()
    tp = args.tp if args.tp is not None else max(1, dist.get_world_size() // (args.pp * args.ep))
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
    )
    initialize_model_parallel(parallel, seed=args.seed)
    model_cfg = preset("tiny-moe")
    chunks = build_model_chunks(model_cfg, parallel)
    optimizer = build_optimizer(chunks, lr=args.lr)
    rank0 = dist.get_rank() == 0

    samples = synthetic_samples(args.samples, vocab_size=model_cfg.vocab_size, seed=args.seed, max_length=24)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_mb = 2
    groups = split_step_samples(samples, dp_rank=dp_rank, dp_size=dp_size, num_microbatches=num_mb)

    def collate(group_samples):
        return [collate_padded(g, pad_multiple=tp, min_length=24) for g in group_samples]

    # Old-policy pass: the current model scores its own "rollout".
    old = collect_log_probs(chunks, collate(groups))
    flat = [s for g in groups for s in g]
    flat = [dataclasses.replace(s, old_log_probs=lp) for s, lp in zip(flat, old)]
    per_mb = len(flat) // num_mb
    groups = [flat[i * per_mb : (i + 1) * per_mb] for i in range(num_mb)]

    spec = PolicyLossSpec(type=args.loss, tau_pos=1.0, tau_neg=1.05)
    if rank0:
        print(f"sapo_megatron demo: {dist.get_world_size()} ranks, TP={tp} PP={args.pp} EP={args.ep} "
              f"DP={dp_size}, loss={args.loss}, {args.samples} samples x {num_mb} microbatches")
    for update in range(args.updates):
        microbatches = assign_step_weights(collate(groups), spec.reduction)
        metrics = run_step(chunks, microbatches, spec, optimizer=optimizer)
        if rank0:
            keep = ("loss", "grad_norm", "ratio_min", "ratio_mean", "ratio_max", "gate_mean_pos",
                    "gate_mean_neg", "low_weight_frac", "approx_kl", "entropy", "num_tokens")
            print(json.dumps({"update": update, **{k: round(metrics[k], 6) for k in keep if k in metrics}}))
    destroy()


if __name__ == "__main__":
    main()
