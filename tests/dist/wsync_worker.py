"""torchrun worker: distributed weight sync from a sharded trainer into real receiving servers.

Run by tests/test_sglang_weight_sync.py::

    torchrun --nproc_per_node=2 tests/dist/wsync_worker.py --tp 2|--ep 2|--pp 2 --hf HF --out OUT \\
        --url http://127.0.0.1:P1 --url http://127.0.0.1:P2 [--bf16] [--load-format none]

Builds the model of HF at this layout, pushes it (version 1) over SGLang's protocol (gloo), writes
the reference HF export (OUT/hf, the disk sync's parallel writer), then restarts the LAST server
(test-only endpoint), finds it stale as the trainer does and re-syncs it (the group is rebuilt).
``--bf16``: the served checkpoint says torch_dtype bfloat16 (the trainer stays fp32).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import export_hf, load_hf_into_model  # noqa: E402
from sapo_megatron.checkpoint.parity import build_model_for_hf_config  # noqa: E402
from sapo_megatron.models import ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.rollout.sglang import DistributedSync, SGLangConfig, SGLangEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--url", action="append", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--load-format", default="flattened_bucket")
    ap.add_argument("--bucket-mb", type=float, default=0.02)
    args = ap.parse_args()
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
                              pipeline_model_parallel_size=args.pp)
    initialize_model_parallel(parallel, seed=1234)
    hf_config = json.loads((Path(args.hf) / "config.json").read_text())
    chunks = build_model_for_hf_config(hf_config, parallel)
    load_hf_into_model(chunks, args.hf)
    served = {**hf_config, "torch_dtype": "bfloat16"} if args.bf16 else hf_config
    config = SGLangConfig(urls=args.url, weight_sync="distributed", backoff_s=0.05, weight_timeout_s=120,
                          distributed={"master_address": "127.0.0.1", "backend": "gloo", "bucket_mb": args.bucket_mb,
                                       "load_format": None if args.load_format == "none" else args.load_format})
    engine = SGLangEngine(config) if dist.get_rank() == 0 else None
    sync = DistributedSync(engine, served, config)
    synced = sync.push(chunks, 1)
    if engine is not None:
        assert synced == args.url, synced
        engine.expect(1)
    export_hf(chunks, Path(args.out) / "hf", served, dtype="checkpoint", max_shard_bytes=64 * 1024)

    # A server restarts: found stale by its version, then re-synced (the group is rebuilt).
    stale = [[]]
    if engine is not None:
        engine.transport.call_json(args.url[-1], "/_test/restart", {}, timeout=10)
        time.sleep(0.5)
        stale = [engine.stale_servers()]
    dist.broadcast_object_list(stale, src=0)
    assert stale[0] == [args.url[-1]], stale
    resynced = sync.resync(chunks, 1, stale[0])
    if engine is not None:
        assert resynced == args.url and sync.rebuilds == 1 and sync.group_name.endswith("_r1"), (resynced, sync.group_name)
        engine.mark_synced(resynced)
        assert engine.stale_servers() == []
        json.dump({"group": sync.group_name}, open(Path(args.out) / "sync.json", "w"))
    sync.close()
    destroy()


if __name__ == "__main__":
    main()
