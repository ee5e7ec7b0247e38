"""The receiving side of SGLang's distributed weight update, re-implemented from its source.

Read from sglang 0.5.23 (never imported): ``utils/common.py: init_custom_process_group``
(rendezvous over tcp, then ``PrefixStore(group_name, store)``, then ``_new_process_group_helper``
outside the default group, rank = ``rank_offset + tp_rank``) and
``model_runner_components/weight_updater.py``: per-tensor receive (``torch.empty(shape,
getattr(torch, dtype))`` + ``broadcast(src=0, async_op=True)`` each, then wait all) or, with
``load_format == "flattened_bucket"``, ``FlattenedTensorBucket.empty`` (offsets from the shapes,
unaligned offsets refused) + ONE uint8 broadcast, cut back into views.

:class:`Receiver` is what tests/sglang_mock.py runs when a test asks for a receiving server; as
a script it serves such a mock in its own process (for benchmarks/bench_weight_sync.py)::

    python -m tests.dist.sglang_receiver --port-file /tmp/port --tp-size 1
"""

from __future__ import annotations

import argparse
import math
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_custom_process_group(backend, init_method, world_size, rank, group_name, timeout=None):
    # SGLang's model runner passes no timeout: the group waits (joins, broadcasts) for torch's
    # default, 30 minutes. So does this one, so a client that waits on a server shows up.
    timeout = timeout or c10d.default_pg_timeout
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def empty_bucket(names, dtypes, shapes):
    """``FlattenedTensorBucket.empty``: offsets from the shapes alone, unaligned refused."""
    metas, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dtype = getattr(torch, dtype)
        if offset % dtype.itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
        size = math.prod(shape) * dtype.itemsize
        metas.append((name, tuple(shape), dtype, offset, offset + size))
        offset += size
    if not metas:
        raise ValueError("Cannot create empty tensor bucket")
    return torch.empty(offset, dtype=torch.uint8), metas


class Receiver:
    """One server's receiving ranks (tp_rank 0 only: one process holds one rank of a group)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.groups: dict[str, object] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.broadcasts = 0  # broadcasts received (one per bucket, or one per tensor)
        self.request_dtypes: list[list[str]] = []  # the dtypes of each update request
        self.bytes = 0
        self.lock = threading.Lock()

    def init_group(self, body: dict, tp_rank: int = 0) -> tuple[bool, str]:
        rank = body["rank_offset"] + tp_rank
        try:
            self.groups[body.get("group_name", "weight_update_group")] = init_custom_process_group(
                backend=body.get("backend", "nccl"), init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                world_size=body["world_size"], rank=rank, group_name=body.get("group_name", "weight_update_group"))
            return True, "Succeeded to initialize custom process group."
        except Exception as e:
            return False, f"Failed to initialize custom process group: {e}."

    def destroy_group(self, name: str) -> tuple[bool, str]:
        if name not in self.groups:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(self.groups.pop(name))
        return True, "Succeeded to destroy custom process group."

    def destroy_all(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)

    def receive(self, body: dict) -> tuple[bool, str]:
        """SGLang 0.5.23 answers any failure of the receive (an unknown group, an unaligned
        bucket, a broadcast that fails or times out) as ``"Failed to receive weights: <error>"``
        (``managers/scheduler_components/weight_updater.py``), never by dropping the request."""
        try:
            return self._receive(body)
        except Exception as e:
            return False, f"Failed to receive weights: {e}"

    def _receive(self, body: dict) -> tuple[bool, str]:
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            raise AssertionError(f"Group {name} not in {list(self.groups)}. "
                                 "Please call `init_weights_update_group` first.")
        group = self.groups[name]
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if body.get("load_format") == "flattened_bucket":
            flat, metas = empty_bucket(names, dtypes, shapes)
            dist.broadcast(flat, src=0, group=group)
            received = [(n, flat[a:b].view(dt).reshape(shape)) for n, shape, dt, a, b in metas]
            count, nbytes = 1, flat.numel()
        else:
            received, handles = [], []
            for n, dt, shape in zip(names, dtypes, shapes):
                weight = torch.empty(shape, dtype=getattr(torch, dt))
                handles.append(dist.broadcast(weight, src=0, group=group, async_op=True))
                received.append((n, weight))
            for h in handles:
                h.wait()
            count, nbytes = len(received), sum(w.numel() * w.element_size() for _, w in received)
        with self.lock:
            if self.keep:  # the "load_weights": keep what arrived, by HF name
                self.weights.update(received)
            self.broadcasts += count
            self.request_dtypes.append(list(dtypes))
            self.bytes += nbytes
        return True, "Succeeded to update parameter online."


def main() -> None:
    from tests.sglang_mock import Behaviour, MockSGLang

    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--drop-weights", action="store_true", help="receive, keep nothing (benchmarks)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--dense", type=int, nargs="*", default=[0])
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--die-at", type=int, default=None, help="restart at this /generate request")
    parser.add_argument("--version", default="0.5.23",
                        help="the SGLang release it plays (weight-update session from 0.5.21)")
    parser.add_argument("--refuse-update-at", type=int, default=None,
                        help="answer the N-th /update_weights_from_distributed with 400, without receiving")
    parser.add_argument("--refusal-delay-s", type=float, default=0.0, help="... after this long")
    parser.add_argument("--custom-weight-loader", nargs="*", default=[], help="as SGLang's flag (delta sync)")
    args = parser.parse_args()
    mock = MockSGLang(Behaviour(receiver=True, tp_size=args.tp_size, keep_weights=not args.drop_weights,
                                num_hidden_layers=args.layers, num_experts=args.experts, topk=args.topk,
                                dense_layers=tuple(args.dense), vocab_size=args.vocab, version=args.version,
                                refuse_update_at=args.refuse_update_at, refusal_delay_s=args.refusal_delay_s,
                                custom_weight_loaders=tuple(args.custom_weight_loader)))
    if args.die_at is not None:
        mock.die_at(args.die_at, down_s=0.2)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(mock.port))
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        mock.stop()


if __name__ == "__main__":
    main()
