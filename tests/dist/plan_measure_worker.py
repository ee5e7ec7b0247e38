"""torchrun worker: the real training step under a live-tensor tracker; writes each rank's peak.

Run by tests/test_plan.py::test_prediction_matches_measured_peak, e.g.::

    torchrun --nproc_per_node=2 tests/dist/plan_measure_worker.py --out M.json -- \\
        model.hidden_size=256 parallel.expert_model_parallel_size=2 ...

The config comes from the overrides (defaults < overrides, as ``train``); the step is what the
trainer runs (``build_model_chunks`` + ``build_optimizer`` + ``run_step``) on
``train.micro_batch_size`` samples of exactly ``--prompt-tokens + rollout.max_new_tokens`` tokens
per microbatch, the microbatch the planner assumes. Everything from the model build on is
tracked: weights, DDP gradient buffers, optimizer state, activations, logits.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.config import load_config  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.step import assign_step_weights, build_model_chunks, build_optimizer, collate_padded, run_step  # noqa: E402
from sapo_megatron.step.synthetic import synthetic_samples  # noqa: E402
from tests.live_memory import LiveTensorPeak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, args.overrides)
    model_cfg, parallel = cfg.model.resolve(), cfg.parallel
    initialize_model_parallel(parallel, seed=0)
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    length = args.prompt_tokens + cfg.rollout.max_new_tokens
    mbs = cfg.train.micro_batch_size
    samples = synthetic_samples(args.microbatches * mbs * dp, vocab_size=model_cfg.vocab_size, seed=1,
                                min_length=length, max_length=length)
    rank_dp = parallel_state.get_data_parallel_rank()
    mine = samples[rank_dp * args.microbatches * mbs:(rank_dp + 1) * args.microbatches * mbs]
    multiple = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
    opt_options = dict(cfg.optim.megatron)
    with LiveTensorPeak() as tracker:
        chunks = build_model_chunks(model_cfg, parallel,
                                    use_distributed_optimizer=bool(opt_options.get("use_distributed_optimizer")))
        optimizer = build_optimizer(chunks, lr=cfg.optim.lr, megatron=opt_options)
        microbatches = [collate_padded(mine[i * mbs:(i + 1) * mbs], pad_multiple=multiple)
                        for i in range(args.microbatches)]
        microbatches = assign_step_weights(microbatches, cfg.loss.reduction)
        # Two steps: Adam creates its moments in the first optimizer step, so the second step's
        # forward and backward run next to them, as every later step does.
        metrics = run_step(chunks, microbatches, cfg.loss, optimizer=optimizer)
        static = tracker.current
        metrics = run_step(chunks, microbatches, cfg.loss, optimizer=optimizer)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"peak": tracker.peak, "before_step": static,
                                   "grad_reduce_in_fp32": chunks[0].ddp_config.grad_reduce_in_fp32,
                                   "loss": metrics["loss"]})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(peaks, f)
    destroy()


if __name__ == "__main__":
    main()
