"""Weight-sync throughput on CPU: 2 trainer ranks (TP=2, gloo) + 1 receiving server process.

Measured in one run, so the ratios hold on a noisy shared machine:
- ``dist_ratio`` = time of ONE bare gloo broadcast of the model's bytes to the receiver (one
  uint8 tensor through the same group, the wire's ceiling; of never-touched and of resident
  memory, the faster counts) / time of the distributed sync (buckets assembled from the TP
  shards and broadcast, HTTP requests included). Target >= 0.7.
- ``disk_ratio`` = time of ``shutil.copyfile`` of the same bytes / time of the disk sync (the
  parallel HF export plus ``/update_weights_from_disk``). Equal conditions: both fsync what they
  write, and the copy's source is a fresh file evicted from the page cache
  (``posix_fadvise(DONTNEED)`` after an fsync), as the sync reads live tensors, not a cached
  file. Target >= 0.5.
- ``speedup_vs_funnel`` = time of the old export (every tensor sent to rank 0, which converts and
  writes all shards; ``_iter_full`` below + ``HFShardWriter``, fsynced) / time of the disk sync.

Each path and its baseline alternate for ``--rounds`` rounds and keep their best (the machine's
load moves within a minute); ``wire_only_s`` is the sync's own buckets and requests broadcast
from prefilled buffers (what the protocol costs without assembly), and the ``stages`` lines give
each trainer rank's seconds per stage of the best round.

The model is a random Qwen3-MoE of about 700 MB in fp32 (what the served checkpoint holds, so
bytes synced = bytes trained). The receiver keeps nothing (``--drop-weights``).

Run: ``python benchmarks/bench_weight_sync.py [--layers 4] [--bucket-mb 64] [--rounds 3] [--real]``; the
last line reads ``dist_ratio=<x> disk_ratio=<y> speedup_vs_funnel=<z> delta_bytes_ratio=<b>
delta_speedup=<d> delta_bound=<u>``.

Delta sync (``rollout.sglang.delta``): the same model served in bf16, trained between pushes by
real Adam steps at lr 1e-6 (``_delta_rounds``). ``delta_bytes_ratio`` = bytes a delta push
writes / bytes of the full model (the worst round; target <= 0.2); ``delta_speedup`` = time of
the full disk sync of the same bf16 weights / time of the delta push (target >= 3). Against the
mock receiver a full push loads nothing while a delta is applied to the loader's host copy;
``--real`` runs these rounds against the real SGLang 0.5.23 CPU server instead (it loads the full
push from disk with its default loader, and the delta with ours through
``/update_weights_from_tensor``), so both sides pay what the server really does.
``delta_bound`` = the full sync's time / the least any delta must do on this machine: one
cast-and-compare pass over the same parameters (every rank its own parts, nothing else:
``_compare_pass``) plus the server writing this round's changed elements into its copy of the
weights (the loader's apply of this round's delta files into a host copy, in one process:
``_apply_pass``; at RL densities the changes touch most cache lines of the weights, so it is a
pass over them too). No delta can beat that ratio here, whatever its encoding or transport.
(Figures recorded before 2026-12-05 04:00 UTC divided by the compare pass alone.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def hf_config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "float32",
        "vocab_size": 32000, "hidden_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 2816, "moe_intermediate_size": 512,
        "num_experts": 16, "num_experts_per_tok": 2, "mlp_only_layers": [], "norm_topk_prob": True,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "hidden_act": "silu",
    }


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _copy_baseline(nbytes: int, work: Path) -> float:
    from sapo_megatron.checkpoint.hf_io import fsync_path

    src, dst = work / "copy_src.bin", work / "copy_dst.bin"
    with open(src, "wb") as f:  # a fresh source, then out of the page cache
        chunk = os.urandom(64 * 1024**2)
        left = nbytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    _drop_cache(src)
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fsync_path(dst)
    elapsed = time.perf_counter() - t0
    src.unlink()
    dst.unlink()
    return elapsed

# --- the old export's gather (kept here as the baseline it is) ---------------------------

@dataclasses.dataclass
class _GatherPlan:
    order: list[str]
    owner: dict[str, int]
    dtype: dict[str, torch.dtype]
    local: dict[str, tuple]


def _plan_gather(model) -> _GatherPlan:
    import torch
    import torch.distributed as dist

    from sapo_megatron.checkpoint.live import _held_tensors
    from sapo_megatron.checkpoint.mapping import group_of, group_order

    local = _held_tensors(model)
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, {n: str(t.dtype).removeprefix("torch.") for n, (_, _, t) in local.items()})
    owner, dtype = {}, {}
    for rank, names in enumerate(held):
        for name, dt in names.items():
            owner.setdefault(name, rank)
            dtype[name] = getattr(torch, dt)
    order = sorted(owner, key=lambda n: (group_order(group_of(n)), n))
    return _GatherPlan(order, owner, dtype, local)


def _iter_full(plan: _GatherPlan) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Full tensors in ``plan.order`` on rank 0 (None elsewhere); collective."""
    import torch
    import torch.distributed as dist

    from sapo_megatron.collectives import group_device
    from sapo_megatron.step.sharding import gather_full_tensor

    rank = dist.get_rank()
    for name in plan.order:
        full = None
        if name in plan.local:
            inner, local_name, tensor = plan.local[name]
            full = gather_full_tensor(tensor.detach(), tensor, local_name, inner.config).cpu()
        src = plan.owner[name]
        # Point-to-point tensors on the default group's device (CUDA under NCCL).
        device = group_device()
        if src != 0 and rank == src:
            header = torch.zeros(8, dtype=torch.int64, device=device)
            header[0] = full.dim()
            header[1 : 1 + full.dim()] = torch.tensor(full.shape, device=device)
            dist.send(header, dst=0)
            dist.send(full.to(device).contiguous(), dst=0)
        elif src != 0 and rank == 0:
            header = torch.empty(8, dtype=torch.int64, device=device)
            dist.recv(header, src=src)
            shape = header[1 : 1 + int(header[0])].tolist()
            full = torch.empty(shape, dtype=plan.dtype[name], device=device)
            dist.recv(full, src=src)
            full = full.cpu()
        yield name, (full if rank == 0 else None)


def _funnel(chunks, out: Path, served: dict) -> None:
    """The export as it was: rank 0 receives every full tensor and writes every shard."""
    import torch.distributed as dist

    from sapo_megatron.checkpoint.hf_io import HFShardWriter, fsync_path, write_hf_config
    from sapo_megatron.checkpoint.mapping import all_units, mapping_for
    from sapo_megatron.checkpoint.transforms import to_hf

    mapping = mapping_for(served)
    cfg = mapping.config_from_hf(served)
    by_mcore = {u.mcore: u for us in all_units(mapping, cfg).values() for u in us}
    plan = _plan_gather(chunks)
    writer = HFShardWriter(out) if dist.get_rank() == 0 else None
    for name, full in _iter_full(plan):
        if writer is not None:
            for hf_name, t in zip(by_mcore[name].hf, to_hf(by_mcore[name].kind, full, cfg)):
                writer.add(hf_name, t)
    if writer is not None:
        for f in writer.close():
            fsync_path(out / f)
        write_hf_config(out, served)
    dist.barrier()


def worker(args) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from sapo_megatron.checkpoint.live import export_plan
    from sapo_megatron.checkpoint.parity import build_model_for_hf_config
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import destroy, initialize_model_parallel
    from sapo_megatron.rollout.sglang import (
        DiskSync,
        DistributedSync,
        SGLangConfig,
        SGLangEngine,
    )
    from sapo_megatron.rollout.sglang.protocol import distributed_update_payload
    from sapo_megatron.rollout.sglang.weight_sync import buckets as bk

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(parallel, seed=1)
    served = hf_config(args.layers)
    chunks = build_model_for_hf_config(served, parallel)
    rank = dist.get_rank()
    work = Path(args.out)
    config = SGLangConfig(urls=[args.url], weight_sync="distributed", weight_timeout_s=600, keep_weight_dirs=1,
                          distributed={"master_address": "127.0.0.1", "backend": "gloo", "bucket_mb": args.bucket_mb})
    engine = SGLangEngine(config) if rank == 0 else None
    nbytes = sum(e.hf_nbytes for e in export_plan(chunks, served, "checkpoint").entries)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    from sapo_megatron.rollout.sglang.weight_sync.distributed import plan_buckets

    sync = DistributedSync(engine, served, config)
    timed(lambda: sync.push(chunks, 1))  # builds the group; warm-up
    buckets = plan_buckets(export_plan(chunks, served, "checkpoint").entries, sync.section.bucket_bytes)

    def bare(raw) -> None:
        if rank != 0:
            return
        payload = distributed_update_payload(["bench.raw"], [torch.uint8], [(nbytes,)], group_name=sync.group_name,
                                             load_format="flattened_bucket", last=False, version=0)
        sync._open_sessions(engine.config.urls)  # 0.5.21+ refuses the update outside a session
        try:
            engine.on_all_servers("/update_weights_from_distributed", lambda u: payload, "bare broadcast",
                                  while_open=lambda: dist.broadcast(raw, src=0, group=sync.pg))
        finally:
            sync._close_sessions(0)

    def wire_only(buffers) -> None:
        """The sync's own wire with nothing to assemble: the same buckets (sizes, one HTTP
        request each, overlap) broadcast from buffers filled beforehand. Splits the sync's time
        into what the protocol costs and what the assembly adds."""
        if rank != 0:
            return
        in_flight = None
        sync._open_sessions(engine.config.urls)
        for k, bucket in enumerate(buckets):
            metas = [m for e in bucket for m in e.hf]
            metas = [metas[i] for i in bk.aligned_order(metas)]
            if in_flight is not None:
                sync._finish(in_flight, 0)
            in_flight = sync._start(metas, buffers[k % 2], 0, last=False)
        sync._finish(in_flight, 0)
        sync._close_sessions(0)

    # Two bare broadcasts: of never-touched memory (every page reads the kernel's one zero page,
    # so the sender's reads all hit cache) and of resident random bytes (as the sync's buffers
    # are). The ratio uses the FASTER of the two: the stricter baseline. The load of the shared
    # machine moves by 2x within a minute, so the sync and its baselines alternate, ``--rounds``
    # times, and each keeps its best round.
    untouched = torch.empty(nbytes, dtype=torch.uint8) if rank == 0 else None
    resident = torch.randint(0, 256, (nbytes,), dtype=torch.uint8) if rank == 0 else None
    size = max(sum(e.hf_nbytes for e in b) for b in buckets)
    prefilled = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(2)] if rank == 0 else None
    runs = {"dist": [], "bare_untouched": [], "bare_resident": [], "wire_only": []}
    for r in range(args.rounds):
        sync.timings = dict.fromkeys(sync.timings, 0.0)
        runs["dist"].append((timed(lambda r=r: sync.push(chunks, 2 + r)), dict(sync.timings)))
        runs["bare_untouched"].append((timed(lambda: bare(untouched)), None))
        runs["bare_resident"].append((timed(lambda: bare(resident)), None))
        runs["wire_only"].append((timed(lambda: wire_only(prefilled)), None))
    untouched = resident = prefilled = None  # freed before the disk rounds
    sync.close()

    disk = DiskSync(engine, served, config, str(work / "disk"), fsync=True)
    runs.update(disk=[], copyfile=[])
    for r in range(args.rounds):
        disk.timings = {}
        runs["disk"].append((timed(lambda r=r: disk.push(chunks, 1 + r)), dict(disk.timings)))
        box = [0.0]
        if rank == 0:
            box[0] = _copy_baseline(nbytes, work)
        dist.broadcast_object_list(box, src=0)
        runs["copyfile"].append((box[0], None))
    delta_ratio = _delta_rounds(args, chunks, served, engine, work, timed, runs)
    best = {k: min(v, key=lambda run: run[0]) for k, v in runs.items()}
    t_dist, t_disk, t_copy = best["dist"][0], best["disk"][0], best["copyfile"][0]
    t_untouched, t_resident, t_wire = best["bare_untouched"][0], best["bare_resident"][0], best["wire_only"][0]
    t_bare = min(t_untouched, t_resident)
    stages: list = [None] * dist.get_world_size()
    dist.all_gather_object(stages, {"dist": best["dist"][1], "disk": best["disk"][1]})
    t_funnel = timed(lambda: _funnel(chunks, work / "funnel", served))
    if rank == 0:
        gb = nbytes / 1e9
        figures = {
            "bytes": nbytes, "bucket_mb": args.bucket_mb,
            "dist_sync_s": t_dist, "bare_broadcast_s": t_bare, "bare_untouched_s": t_untouched,
            "bare_resident_s": t_resident, "wire_only_s": t_wire, "disk_sync_s": t_disk, "copyfile_s": t_copy,
            "funnel_s": t_funnel, "dist_GBps": gb / t_dist, "bare_GBps": gb / t_bare, "disk_GBps": gb / t_disk,
            "copy_GBps": gb / t_copy, "funnel_GBps": gb / t_funnel,
            "delta_sync_s": best["delta"][0], "full_bf16_sync_s": best["full_bf16"][0], "delta_bytes_ratio": delta_ratio,
            "compare_pass_s": best["compare_pass"][0], "apply_pass_s": best["apply_pass"][0],
        }
        print(json.dumps(figures, indent=1))
        print("rounds (s): " + " ".join(f"{k}=" + ",".join(f"{t:.2f}" for t, _ in v) for k, v in runs.items()))
        # Per-stage seconds of the fastest run, per trainer rank (dist: wire_wait_s on rank 0 only).
        for r, st in enumerate(stages):
            for path in ("dist", "disk"):
                print(f"stages rank{r} {path}: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(st[path].items())))
        print(f"dist_ratio={t_bare / t_dist:.3f} disk_ratio={t_copy / t_disk:.3f} "
              f"speedup_vs_funnel={t_funnel / t_disk:.3f} delta_bytes_ratio={delta_ratio:.4f} "
              f"delta_speedup={best['full_bf16'][0] / best['delta'][0]:.3f} "
              f"delta_bound={best['full_bf16'][0] / (best['compare_pass'][0] + best['apply_pass'][0]):.3f}",
              flush=True)
        engine.close()
    destroy()


def _train_step(chunks, opt, ids) -> None:
    """One real optimizer step: next-token cross-entropy on ``ids`` through the TP=2 model."""
    import torch
    from megatron.core import tensor_parallel

    from sapo_megatron.checkpoint.parity import causal_mask

    model = chunks[0]
    seq = ids.shape[1]
    logits = model(input_ids=ids, position_ids=torch.arange(seq).unsqueeze(0).expand(ids.shape[0], -1),
                   attention_mask=causal_mask(seq))
    target = torch.roll(ids, -1, dims=1)
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _delta_rounds(args, chunks, served, engine, work, timed, runs) -> float:
    """``delta_speedup`` and ``delta_bytes_ratio``: the model served in bf16 (fp32 master weights,
    trained by Adam at lr 1e-6 on real next-token losses between pushes, as in RL), each round one
    optimizer step, then the delta push and the full disk push of the same weights, alternating.
    The receiver applies each delta to its host copy with our loader (``sapo_sglang``); it loads
    nothing from a full push (``--drop-weights``), which favours the full sync. Returns the
    largest bytes ratio of the rounds (delta bytes / full bytes)."""
    import torch
    import torch.distributed as dist

    from sapo_megatron.checkpoint.parity import random_input_ids
    from sapo_megatron.rollout.sglang import DiskSync, SGLangConfig
    from sapo_megatron.rollout.sglang.weight_sync.delta import DeltaSync

    served16 = dict(served, torch_dtype="bfloat16")
    url = args.delta_url or args.url
    config = SGLangConfig(urls=[url], weight_sync="disk", delta=True, delta_checksum_every=0,
                          weight_timeout_s=600, keep_weight_dirs=1)
    if args.delta_url:  # the real SGLang server: its own engine (rank 0)
        from sapo_megatron.rollout.sglang import SGLangEngine

        engine = SGLangEngine(config) if dist.get_rank() == 0 else None
    full = DiskSync(engine, served16, config, str(work / "full_bf16"), fsync=True)
    delta = DeltaSync(engine, served16, config, str(work / "delta"), fsync=True)
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)
    ids = random_input_ids(served["vocab_size"], batch=2, seq=64, seed=3)
    timed(lambda: delta.push(chunks, 1000))  # the first push is full: the loader's base
    host = None  # rank 0: the server's floor (_apply_pass) applies to a host copy of the HF tensors
    if dist.get_rank() == 0:
        from sapo_sglang.delta_loader import load_dir

        host = load_dir(delta.base[0])
    _train_step(chunks, opt, ids)
    timed(lambda: delta.push(chunks, 1001))  # warm-up: the receiver's loader reads its base once
    _apply_pass(delta, 1001, host)  # warm-up: the host copy's pages are touched once, as a server's are
    ratios = []
    runs.update(delta=[], full_bf16=[])
    for r in range(args.rounds):
        _train_step(chunks, opt, ids)
        runs["delta"].append((timed(lambda r=r: delta.push(chunks, 1002 + r)), None))
        metrics = delta.take_metrics()
        ratios.append(metrics["weight_sync/delta_ratio"])
        if dist.get_rank() == 0:
            print("delta stages: " + " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in sorted(metrics.items())
                                              if k.endswith("_s")), flush=True)
        runs["full_bf16"].append((timed(lambda r=r: full.push(chunks, 1002 + r)), None))
        runs.setdefault("apply_pass", []).append((timed(lambda r=r: _apply_pass(delta, 1002 + r, host)), None))
        runs.setdefault("compare_pass", []).append((timed(lambda: _compare_pass(chunks, served16, delta)), None))
    assert delta.fallbacks == 0, "the benchmark's deltas fell back to full syncs"
    return max(ratios)


def _apply_pass(delta, version: int, host: dict | None) -> None:
    """The least the server must do for a delta: rank 0 reads this round's delta files (every
    trainer rank's) and applies them to a host copy of the HF tensors with the loader's own code;
    no HTTP, no ``load_weights``, no checksum. The copy drifts from the trainer's (each round
    applies on top of the last), which does not change the work."""
    if host is None:
        return
    import glob

    import torch

    from sapo_sglang.delta_loader import apply_parts, read_delta_file

    # Without the trainer's CPU compatibility mode (a torch-function mode, ~2 us per torch
    # call), which no server process has.
    with torch._C.DisableTorchFunction():
        for path in sorted(glob.glob(os.path.join(delta.delta_dir, f"v{version}_r*.safetensors"))):
            parts, meta = read_delta_file(path)
            apply_parts(host, parts, meta.get("regions", {}))


def _compare_pass(chunks, served16, delta) -> None:
    """The least any delta must do: every rank casts its own parts to bf16 and compares them with
    what the servers hold, block by block (no positions, no encoding, no files, no server). Its
    time bounds ``delta_speedup`` from above on this machine whatever the encoding or transport:
    ``delta_bound`` = full sync time / this."""
    import torch
    import torch.distributed as dist

    from sapo_megatron.checkpoint.live import export_plan
    from sapo_megatron.rollout.sglang.weight_sync.delta_pieces import CHUNK_ELEMENTS, row_blocks, local_pieces

    scratch = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.int16)
    mask = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.bool)
    with torch.no_grad():
        for piece in local_pieces(export_plan(chunks, served16, "checkpoint"), dist.get_rank()):
            held = delta.differ.held[piece.key].view(torch.int16)
            for row, rows, offset in row_blocks(piece.source):
                src = piece.source.narrow(0, row, rows)
                new = scratch[: src.numel()]
                new.view(torch.bfloat16).view(src.shape).copy_(src)
                torch.ne(new, held[offset : offset + src.numel()], out=mask[: src.numel()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--url")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--real", action="store_true",
                    help="the delta rounds against the REAL SGLang 0.5.23 CPU server (tests/real_sglang venv)")
    ap.add_argument("--delta-url", help=argparse.SUPPRESS)  # set by --real for the worker
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_ws_"))
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    port_file = out / "receiver.port"
    real = None
    receiver = subprocess.Popen([sys.executable, "-m", "tests.dist.sglang_receiver", "--port-file", str(port_file),
                                 "--drop-weights", "--custom-weight-loader", "sapo_sglang.delta_loader.apply_delta"],
                                cwd=ROOT, env=env)
    try:
        while not port_file.exists():
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--url", url, "--layers", str(args.layers), "--bucket-mb", str(args.bucket_mb),
               "--rounds", str(args.rounds), "--out", str(out)]
        if args.real:
            real = _real_server(args.layers, out)
            cmd += ["--delta-url", real.url]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    finally:
        receiver.kill()
        receiver.wait()
        if real is not None:
            real.stop()
        shutil.rmtree(out, ignore_errors=True)


def _real_server(layers: int, out: Path):
    """The real SGLang server (CPU) serving the benchmark's model in bf16, with our delta loader:
    random weights of ``hf_config(layers)`` (the first push replaces them) and the real-server
    tier's tokenizer."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT))  # tests.real_sglang: the real-server tier's harness
    from tests.real_sglang.harness import DELTA_LOADER, RealServer, ensure_venv, make_tiny_model

    model = out / "real_model"
    tokenizer = make_tiny_model(out / "real_tokenizer")
    cfg = dict(hf_config(layers), torch_dtype="bfloat16")
    ids = json.loads((tokenizer / "config.json").read_text())
    cfg.update(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
                           ).to(torch.bfloat16).save_pretrained(str(model))
    for f in tokenizer.glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    return RealServer(ensure_venv(), model, log_dir=out, args=("--custom-weight-loader", DELTA_LOADER)).start()


if __name__ == "__main__":
    main()
