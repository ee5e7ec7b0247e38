"""torchrun worker: distributed weight sync from a sharded trainer into real receiving servers.

Run by tests/test_sglang_weight_sync.py::

    torchrun --nproc_per_node=2 tests/dist/wsync_worker.py --tp 2|--ep 2|--pp 2 --hf HF --out OUT \\
        --url http://127.0.0.1:P1 --url http://127.0.0.1:P2 [--bf16] [--load-format none] \\
        [--no-shared-memory] [--unmapped-rank R ...]

Builds the model of HF at this layout, pushes it (version 1) over SGLang's protocol (gloo), writes
the reference HF export (OUT/hf, the disk sync's parallel writer), then restarts the LAST server
(test-only endpoint), finds it stale as the trainer does and re-syncs it (the group is rebuilt).
``--bf16``: the served checkpoint says torch_dtype bfloat16 (the trainer stays fp32).
``--no-shared-memory``: ``distributed.shared_memory: false``. ``--unmapped-rank R``: rank R cannot
map rank 0's shared-memory file, as a rank on another host (its holders must use the exchange).
Each rank writes OUT/stats<rank>.json: the bytes it wrote into the shared-memory buckets over both
pushes, whether it mapped them, and its tensor-parallel share (the bytes of its TP-sliced
tensors in the served dtype, counted from its parameters, not from the export plan).
``--check-order``: the shared-memory handshake under adverse timing. Rank 0 answers each bucket
late (a sleep before waiting for it) and checks that its buffer is unchanged from the moment its
broadcast starts until it is done (a holder running ahead would write the next bucket into it);
the other ranks stall before their first write (rank 0 must not broadcast before they are done:
the servers would receive the stale bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import export_hf, live, load_hf_into_model  # noqa: E402
from sapo_megatron.checkpoint.parity import build_model_for_hf_config  # noqa: E402
from sapo_megatron.models import ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.rollout.sglang import DistributedSync, SGLangConfig, SGLangEngine  # noqa: E402
from sapo_megatron.rollout.sglang.weight_sync import shared  # noqa: E402


def check_order(sync) -> dict:
    """``--check-order`` (see the module docstring); the returned counts fill in as it runs."""
    counts = {"buffers_checked": 0, "overwritten_in_flight": 0}
    if dist.get_rank() != 0:
        place, first = live.place, [True]

        def slow_place(target, source):
            if first:
                first.clear()
                time.sleep(0.3)
            place(target, source)

        live.place = slow_place
        return counts
    start, finish, sent = sync._start, sync._finish, {}

    def checked_start(metas, buffer, version, *, last):
        in_flight = start(metas, buffer, version, last=last)
        sent[id(in_flight)] = (buffer, buffer.clone())
        return in_flight

    def checked_finish(in_flight, version):
        time.sleep(0.05)  # a slow answer: a holder running ahead would write this buffer now
        finish(in_flight, version)
        buffer, then = sent.pop(id(in_flight))
        counts["buffers_checked"] += 1
        counts["overwritten_in_flight"] += not torch.equal(buffer, then)

    sync._start, sync._finish = checked_start, checked_finish
    return counts


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
    ap.add_argument("--no-shared-memory", action="store_true")
    ap.add_argument("--unmapped-rank", type=int, action="append", default=[])
    ap.add_argument("--check-order", action="store_true")
    args = ap.parse_args()
    if int(os.environ["RANK"]) in args.unmapped_rank:  # what a rank on another host finds: no such file
        shared._attach = lambda *a: None
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
                              pipeline_model_parallel_size=args.pp)
    initialize_model_parallel(parallel, seed=1234)
    hf_config = json.loads((Path(args.hf) / "config.json").read_text())
    chunks = build_model_for_hf_config(hf_config, parallel)
    load_hf_into_model(chunks, args.hf)
    served = {**hf_config, "torch_dtype": "bfloat16"} if args.bf16 else hf_config
    config = SGLangConfig(urls=args.url, weight_sync="distributed", backoff_s=0.05, weight_timeout_s=120,
                          distributed={"master_address": "127.0.0.1", "backend": "gloo", "bucket_mb": args.bucket_mb,
                                       "load_format": None if args.load_format == "none" else args.load_format,
                                       "shared_memory": not args.no_shared_memory})
    engine = SGLangEngine(config) if dist.get_rank() == 0 else None
    sync = DistributedSync(engine, served, config)
    checked = check_order(sync) if args.check_order else {}
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
    served_dtype = getattr(torch, served["torch_dtype"]) if "torch_dtype" in served else None  # None: as trained
    tp_share = sum(t.numel() * (served_dtype or t.dtype).itemsize for c in chunks for t in c.parameters()
                   if getattr(t, "tensor_model_parallel", False))
    stats = {"shared_bytes": sync.shared_bytes, "mapped": bool(sync.shm and sync.shm.mapped),
             "shm_path": sync.shm.path if sync.shm else None, "tp_share": tp_share, **checked}
    (Path(args.out) / f"stats{dist.get_rank()}.json").write_text(json.dumps(stats))
    sync.close()
    destroy()


if __name__ == "__main__":
    main()
