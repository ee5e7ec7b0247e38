"""torchrun worker: the distributed weight sync's session and group lifecycle, against receivers.

Run by tests/test_sglang_weight_lifecycle.py::

    torchrun --nproc_per_node=2 tests/dist/dsync_worker.py --hf HF --out OUT --runs RUNS_JSON [--crash]

A TP=2 trainer holds the model of HF. ``RUNS_JSON`` lists "runs" of the trainer in order, each
with new client objects (an ``SGLangEngine`` on rank 0, a ``DistributedSync`` everywhere), as a
rerun or a resume would have them::

    [{"urls": [...], "pushes": 1, "close": true, "token": null}, ...]

A run pushes versions 1..``pushes`` and records each outcome on every rank in OUT/rank<r>.json
(``{"ok", "error", "group", "synced", "shared_bytes", "shm_files"}``: a failed push is recorded,
not raised, so the test can tell which phase raised on which rank; ``shared_bytes``: what this
rank wrote into the shared-memory buckets so far, ``shm_files``: the files of this run's
shared-memory buckets still in /dev/shm after the push), then calls ``close()`` unless ``close`` is false. ``token`` pins the
run's group token, to collide with a group left on the servers on purpose. ``--crash`` ends the
process after the last run without closing anything (``os._exit``): a trainer that crashed.

``weight_timeout_s`` is 600 s: a sync that waits on a store or a broadcast instead of failing
shows up as the test's own time limit, not as a slow pass.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import load_hf_into_model  # noqa: E402
from sapo_megatron.checkpoint.parity import build_model_for_hf_config  # noqa: E402
from sapo_megatron.models import ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.rollout.sglang import DistributedSync, SGLangConfig, SGLangEngine  # noqa: E402
from sapo_megatron.rollout.sglang.weight_sync.shared import SHM_DIR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--crash", action="store_true")
    args = ap.parse_args()
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(parallel, seed=1234)
    hf_config = json.loads((Path(args.hf) / "config.json").read_text())
    chunks = build_model_for_hf_config(hf_config, parallel)
    load_hf_into_model(chunks, args.hf)
    rank = dist.get_rank()
    outcomes = []
    for run in json.loads(args.runs):
        config = SGLangConfig(urls=run["urls"], weight_sync="distributed", backoff_s=0.05, weight_timeout_s=600,
                              distributed={"master_address": "127.0.0.1", "backend": "gloo", "bucket_mb": 0.02})
        engine = SGLangEngine(config) if rank == 0 else None
        sync = DistributedSync(engine, hf_config, config)
        if run.get("token"):
            sync.token = run["token"]
        for version in range(1, run.get("pushes", 1) + 1):
            try:
                synced = sync.push(chunks, version)
                outcome = {"ok": True, "error": None, "group": sync.group_name, "synced": synced}
            except RuntimeError as err:
                outcome = {"ok": False, "error": str(err), "group": sync.group_name, "synced": []}
            shm_files = sorted(map(str, Path(SHM_DIR).glob(f"sapo-wsync-{sync.token}-*")))
            outcomes.append({**outcome, "shared_bytes": sync.shared_bytes, "shm_files": shm_files})
        if run.get("close", True):
            sync.close()
            if engine is not None:
                engine.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.barrier()
    if args.crash:
        os._exit(0)  # no close(), no destroy: the servers keep what this trainer left there
    destroy()


if __name__ == "__main__":
    main()
