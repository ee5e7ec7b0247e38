"""torchrun worker: one SAPO step under token-budget microbatches, balanced over DP ranks.

Run by tests/test_dist_budget.py, e.g.::

    torchrun --nproc_per_node=2 tests/dist/budget_worker.py --budget 30 --weights W.pt --out G.pt

The same global batch as tests/dist/step_worker.py (whose single-rank, fixed-count run is the
reference): each DP rank starts from its contiguous share, exactly as the trainer's fixed split
gives it, then :func:`sapo_megatron.step.plan.plan_minibatch` moves samples between DP ranks and
packs them under ``--budget``. Rank 0 writes the full gradients, the step metrics and what the
plan did (for the test's non-vacuity guards).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.models import ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.step import (  # noqa: E402
    PolicyLossSpec,
    assign_step_weights,
    build_model_chunks,
    collate_packed,
    collate_padded,
    run_step,
)
from sapo_megatron.step.batch import split_step_samples  # noqa: E402
from sapo_megatron.step.plan import enable_variable_seq_lengths, needs_equal_shapes, plan_minibatch  # noqa: E402
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from tests.helpers import gather_full, load_full_state_dict, merge_over_ranks  # noqa: E402
from sapo_megatron.step.synthetic import synthetic_samples  # noqa: E402
from tests.dist.step_worker import GLOBAL_BATCH, MAX_LEN, MODEL  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--reduction", default="seq_mean_token_mean")
    ap.add_argument("--layout", choices=["padded", "packed"], default="padded")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              expert_model_parallel_size=args.ep)
    initialize_model_parallel(parallel, seed=1234)
    from megatron.core import parallel_state

    chunks = build_model_chunks(MODEL, parallel)
    model = chunks[0]
    load_full_state_dict(model, torch.load(args.weights))
    if args.pp > 1:
        enable_variable_seq_lengths(chunks)

    samples = synthetic_samples(GLOBAL_BATCH, vocab_size=MODEL.vocab_size, seed=7, max_length=MAX_LEN)
    [mine] = split_step_samples(samples, dp_rank=parallel_state.get_data_parallel_rank(),
                                dp_size=parallel_state.get_data_parallel_world_size(), num_microbatches=1)
    plan = plan_minibatch(mine, budget=args.budget, layout=args.layout, pad_multiple=args.tp,
                          group=parallel_state.get_data_parallel_group(), equal_shapes=needs_equal_shapes(chunks))
    collate = collate_padded if args.layout == "padded" else collate_packed
    microbatches = [collate(g, pad_multiple=args.tp, min_length=n) for g, n in zip(plan.groups, plan.min_lengths)]
    microbatches = assign_step_weights(microbatches, args.reduction)
    spec = PolicyLossSpec(reduction=args.reduction, tau_pos=1.0, tau_neg=1.05, logprob_chunk_size=5)
    metrics = run_step(chunks, microbatches, spec)

    grads = {n: p.main_grad.detach() for n, p in unwrap(model).named_parameters()}
    full_grads = merge_over_ranks(gather_full(model, grads))
    info = {"num_microbatches": len(microbatches), "shapes": sorted({tuple(mb.tokens.shape) for mb in microbatches}),
            "moved": plan.moved, "tokens_by_rank": plan.tokens_by_rank}
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if dist.get_rank() == 0:
        torch.save({"grads": full_grads, "metrics": metrics, "plans": infos}, args.out)
    destroy()


if __name__ == "__main__":
    main()
