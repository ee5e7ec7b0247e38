"""Two ranks that see the run directory differently still resume alike (tests/test_trainer_checkpoint.py).

Rank 0 publishes a checkpoint's tracker and ``meta.json``; rank 1 is then made to see none, as
a node whose NFS client still caches the directory from before the previous job wrote it.
``Trainer._maybe_resume`` runs on a stand-in trainer whose ``load_checkpoint`` is one object
all-gather (dist_checkpointing's load is collective too); then the steps every rank reached are
gathered and rank 0 reports them.

    torchrun --nproc_per_node=2 tests/dist/resume_worker.py OUT
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch.distributed as dist

from sapo_megatron.config.schema import TimeoutsSection
from sapo_megatron.trainer import checkpoint as ckpt
from sapo_megatron.trainer import loop


def load_checkpoint(path, chunks, optimizer, scheduler):
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, str(path))
    return json.loads((Path(path) / ckpt.META).read_text())


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        (out / "checkpoints" / ckpt.iter_name(3)).mkdir(parents=True)
        (out / "checkpoints" / ckpt.iter_name(3) / ckpt.META).write_text(
            json.dumps({"step": 3, "rl_step": 3, "data": {}, "cold_start": None}))
        (out / "checkpoints" / ckpt.TRACKER).write_text("3")
    dist.barrier()
    if rank == 1:  # this node's view of the shared directory lags
        for module in (ckpt, loop):
            module.latest_checkpoint = lambda root: None
        print(f"rank 1 sees {ckpt.latest_checkpoint(out)}", flush=True)
    loop.load_checkpoint = load_checkpoint
    trainer = types.SimpleNamespace(
        cfg=types.SimpleNamespace(run=types.SimpleNamespace(resume=True, timeouts=TimeoutsSection())),
        out=out, chunks=None, optimizer=None, scheduler=None, rank=rank, step=0,
        stream=types.SimpleNamespace(load_state_dict=lambda state: None),
        cold_start=types.SimpleNamespace(load_state_dict=lambda state, rl_step: None),
        rollouts=types.SimpleNamespace(load_meta=lambda meta: None))
    trainer._phase = types.MethodType(loop.Trainer._phase, trainer)
    loop.Trainer._maybe_resume(trainer)
    steps: list = [None] * dist.get_world_size()
    dist.all_gather_object(steps, trainer.step)
    if rank == 0:  # one writer: two ranks printing to one pipe can interleave their lines
        print("\n".join(f"rank {r}: steps {steps}" for r in range(len(steps))), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
