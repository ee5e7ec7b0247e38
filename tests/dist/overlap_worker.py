"""torchrun worker: the sharded optimizer with overlapped gradient reduce and parameter gather.

Run by tests/test_dist_step.py::test_overlapped_param_gather_needs_and_gets_sync_params::

    torchrun --nproc_per_node=2 tests/dist/overlap_worker.py --out R.pt

Two copies of one model at DP=2, one built with ``overlap=False`` (Megatron gathers the
updated shards inside ``optimizer.step``), one with ``overlap=True`` (the gather waits for the
next forward's pre-hooks). After one identical step, rank 0 saves both copies' parameters, the
overlapped copy's before and after :func:`sapo_megatron.step.sync_params`.
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
    build_optimizer,
    collate_padded,
    run_step,
    sync_params,
)
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from sapo_megatron.step.synthetic import synthetic_samples  # noqa: E402
from tests.dist.step_worker import GLOBAL_BATCH, MAX_LEN, MODEL  # noqa: E402
from tests.helpers import this_rank_microbatches  # noqa: E402


def _params(chunks) -> dict:
    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    initialize_model_parallel(ParallelConfig(), seed=1234)
    samples = synthetic_samples(GLOBAL_BATCH, vocab_size=MODEL.vocab_size, seed=7, max_length=MAX_LEN)
    microbatches = [collate_padded(g, min_length=MAX_LEN) for g in this_rank_microbatches(samples, 2)]
    microbatches = assign_step_weights(microbatches, "seq_mean_token_mean")
    spec = PolicyLossSpec(type="sapo")
    runs, start = {}, None
    for overlap in (False, True):
        chunks = build_model_chunks(MODEL, ParallelConfig(), use_distributed_optimizer=True, overlap=overlap)
        if start is None:
            start = _params(chunks)
        else:
            with torch.no_grad():
                for n, p in unwrap(chunks[0]).named_parameters():
                    p.copy_(start[n])
        # A large lr: every parameter moves by far more than bf16/fp32 rounding.
        optimizer = build_optimizer(chunks, lr=1e-2, megatron={"use_distributed_optimizer": True})
        run_step(chunks, microbatches, spec, optimizer=optimizer)
        runs[overlap] = _params(chunks)
        if overlap:
            sync_params(chunks)
            runs["synced"] = _params(chunks)
    if dist.get_rank() == 0:
        torch.save({"start": start, "sync": runs[False], "overlap": runs[True], "synced": runs["synced"]}, args.out)
    destroy()


if __name__ == "__main__":
    main()
