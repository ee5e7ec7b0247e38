"""torchrun worker: train a tiny MoE a few optimizer steps, save a dist checkpoint; or load one at
another layout; then take one more update on a fixed batch. Run by tests/test_dist_checkpoint.py::

    torchrun --nproc_per_node=2 tests/dist/dcp_worker.py --tp 2 --save RUN --steps 2 --out A.pt
    torchrun --nproc_per_node=1 tests/dist/dcp_worker.py --load RUN --out B.pt

Rank 0 writes ``{"state": full params + Adam moments + scheduler state right after the save or
load, "after": full params after one more update, "metrics", "lr"}``. Full tensors are gathered
from the shards with ``sapo_megatron.step.sharding`` (not through dist_checkpointing), so the
comparison checks the checkpoint against an independent view of the live state. With the
distributed optimizer the Adam moments are sharded in flat buffers and are not gathered; its
checks rest on the update that follows.

Every global batch depends only on its step index, so the run that saved and the run that
loaded see the same samples whatever their data-parallel size.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.config.schema import OptimConfig, RunConfig, TrainConfig, TrainSection  # noqa: E402
from sapo_megatron.models import ModelConfig, ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.step import (  # noqa: E402
    PolicyLossSpec,
    assign_step_weights,
    build_model_chunks,
    build_optimizer,
    collate_padded,
    run_step,
)
from sapo_megatron.step.batch import split_step_samples  # noqa: E402
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from tests.helpers import gather_full, merge_over_ranks  # noqa: E402
from sapo_megatron.step.synthetic import synthetic_samples  # noqa: E402
from sapo_megatron.trainer import checkpoint as ckpt  # noqa: E402
from sapo_megatron.trainer.schedule import build_scheduler  # noqa: E402

# 4 layers (layer 0 dense) so that PP=2 has MoE layers on both stages; 4 experts for EP=4.
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                    num_experts=4, num_experts_per_tok=2, first_k_dense=1)
GLOBAL_BATCH, MAX_LEN = 8, 14
SPEC = PolicyLossSpec(type="sapo", reduction="seq_mean_token_mean", tau_pos=1.0, tau_neg=1.05)


def train_config(**optim) -> TrainConfig:
    # Warm-up from init_lr, then cosine: the scheduler's position matters after a resume.
    o = dict(lr=1e-2, init_lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr=1e-4, decay_steps=8,
             weight_decay=0.01)
    o.update(optim)
    return TrainConfig(run=RunConfig(steps=4), optim=OptimConfig(**o), train=TrainSection(updates_per_rollout=1))


def update(chunks, optimizer, scheduler, step: int, tp: int) -> dict:
    from megatron.core import parallel_state as ps

    samples = synthetic_samples(GLOBAL_BATCH, vocab_size=MODEL.vocab_size, seed=100 + step, max_length=MAX_LEN)
    groups = split_step_samples(samples, dp_rank=ps.get_data_parallel_rank(),
                                dp_size=ps.get_data_parallel_world_size(), num_microbatches=1)
    mbs = assign_step_weights([collate_padded(g, pad_multiple=tp, min_length=MAX_LEN) for g in groups],
                              SPEC.reduction)
    metrics = run_step(chunks, mbs, SPEC, optimizer=optimizer)
    scheduler.step(increment=1)
    return metrics


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def full_state(chunks, optimizer, distributed: bool) -> dict:
    model = chunks[0]
    named = dict(unwrap(model).named_parameters())
    out = {"param." + k: v for k, v in merge_over_ranks(gather_full(model, {n: p.detach() for n, p in named.items()})).items()}
    if not distributed:
        for key in ("exp_avg", "exp_avg_sq"):
            local = {}
            for name, p in named.items():
                for inner in _inner_optimizers(optimizer):
                    if p in inner.optimizer.state:
                        local[name] = inner.optimizer.state[p][key]
            out.update({f"{key}.{k}": v for k, v in merge_over_ranks(gather_full(model, local)).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--distopt", action="store_true")
    ap.add_argument("--save", help="run directory to train in and save to")
    ap.add_argument("--load", help="run directory to resume from")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              expert_model_parallel_size=args.ep)
    initialize_model_parallel(parallel, seed=1234)
    cfg = train_config()
    megatron = {"use_distributed_optimizer": args.distopt}
    chunks = build_model_chunks(MODEL, parallel, use_distributed_optimizer=args.distopt)
    o = cfg.optim
    optimizer = build_optimizer(chunks, lr=o.lr, weight_decay=o.weight_decay, megatron=megatron)
    scheduler = build_scheduler(optimizer, cfg)
    if args.save:
        for step in range(args.steps):
            update(chunks, optimizer, scheduler, step, args.tp)
        ckpt.save_checkpoint(args.save, args.steps, chunks, optimizer, scheduler,
                             meta={"data": {"step": args.steps}}, async_save=args.async_save)
        ckpt.finalize_async_saves()
        step = args.steps
    else:
        path = ckpt.latest_checkpoint(args.load)
        try:
            meta = ckpt.load_checkpoint(path, chunks, optimizer, scheduler)
        except ckpt.CheckpointError as err:
            if dist.get_rank() == 0:
                torch.save({"error": str(err)}, args.out)
            destroy()
            return
        step = meta["step"]
    state = full_state(chunks, optimizer, args.distopt)
    sched = scheduler.state_dict()
    lr = optimizer.param_groups[0]["lr"]
    metrics = update(chunks, optimizer, scheduler, step, args.tp)
    after = full_state(chunks, optimizer, args.distopt)
    if dist.get_rank() == 0:
        torch.save({"state": state, "after": after, "metrics": metrics, "scheduler": sched, "lr": lr}, args.out)
    destroy()


if __name__ == "__main__":
    main()
