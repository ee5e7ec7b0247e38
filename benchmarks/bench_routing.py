"""Routing-replay data path benchmark: decode + compact + align + shard of SGLang payloads.

Shape: Qwen3-30B-A3B (48 layers, all MoE, top-8 of 128 experts), 64 samples x 4096 tokens by
default; ``--samples 8 --tokens 512`` for a quick run. One core (``torch.set_num_threads(1)``).

    python benchmarks/bench_routing.py                 # full size, ~1 GB of base64 built first
    python benchmarks/bench_routing.py --samples 8 --tokens 512

What is timed: for every sample, ``decode_routed_experts`` straight into compact uint8
storage (base64 decode, row/shape checks, id range, duplicate ids); then, per microbatch, the
padded alignment (fallback row, pads), the sequence-parallel shard of one TP rank, the MoE layers
of one pipeline stage (built directly, never the whole microbatch), and each of those layers
widened to the router's int64 targets. The
payload strings are built before the timed region. Throughput is counted in GB of the int32
payload (rows x layers x topk x 4 bytes), the unit of SGLang's wire format.

Peak memory, measured honestly: tracemalloc does not see torch's allocations, so the benchmark
resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` <- 5) once the payloads are
built, and reports ``(VmHWM - RSS before the pipeline) / compact payload bytes``, where the
compact payload is what the rollout batch keeps (samples x rows x MoE layers x topk x 1 byte).
That ratio includes the retained compact routes themselves (1.0) plus every transient: one
sample's decoded bytes at a time, and one microbatch's aligned routes and its shard. Samples are
processed one by one; the int32 payloads are never all decoded at once.

Then the overhead of a replayed training step vs a live-routed one (``bench_replay_overhead``).

Its last line reads ``decode_gb_per_s=<x> peak_mem_ratio=<y> replay_step_overhead=<z>``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import torch

from sapo_megatron.routing import (
    align_padded,
    decode_routed_experts,
    encode_routed_experts,
    layer_targets,
    moe_slots,
    stage_moe_layers,
    storage_dtype,
)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def build_payloads(args) -> list[dict]:
    """SGLang meta_info dicts: int32 routes with distinct ids per token (a random rotation of a
    spread of ``topk`` ids, cheap to generate and never repeating within a token)."""
    gen = torch.Generator().manual_seed(0)
    rows = args.tokens - 1
    spread = torch.arange(args.topk) * (args.experts // args.topk)
    payloads = []
    for _ in range(args.samples):
        offset = torch.randint(0, args.experts, (rows, args.layers, 1), generator=gen)
        routes = (offset + spread) % args.experts
        payloads.append({"routed_experts": encode_routed_experts(routes.to(torch.int32))})
    return payloads


def bench_pipeline(args) -> dict:
    torch.set_num_threads(1)
    payloads = build_payloads(args)
    moe_pattern = [1] * args.layers
    stage_layers = stage_moe_layers(moe_pattern, pp_size=args.pp, pp_rank=0)
    slots = moe_slots(moe_pattern, stage_layers)
    dtype = storage_dtype(args.experts)
    gc.collect()
    # Hand freed heap back to the kernel first, or the pipeline would reuse memory that the
    # payload building left resident and the high-water mark would understate its peak.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    _reset_peak_rss()
    rss_before = _rss_kib("VmRSS")

    start = time.perf_counter()
    compact = [
        decode_routed_experts(
            meta,
            num_layers=args.layers,
            topk=args.topk,
            prompt_len=args.tokens // 2,
            response_len=args.tokens - args.tokens // 2,
            num_experts=args.experts,
            sample_id=i,
            out_dtype=dtype,
        )
        for i, meta in enumerate(payloads)
    ]
    decoded = time.perf_counter()
    checksum = 0
    for first in range(0, args.samples, args.micro_batch):
        # Only the tokens of TP rank 0's sequence shard and stage 0's layers are built.
        shard, replay, pad = align_padded(
            compact[first : first + args.micro_batch], args.tokens, topk=args.topk,
            tp_rank=0, tp_size=args.tp, slots=slots,
        )
        for slot in range(shard.shape[2]):
            checksum += int(layer_targets(shard, slot)[-1, -1])
        del shard
    end = time.perf_counter()
    peak_kib = _rss_kib("VmHWM")

    payload_bytes = args.samples * (args.tokens - 1) * args.layers * args.topk * 4
    compact_bytes = sum(c.numel() * c.element_size() for c in compact)
    return {
        "payload_gb": payload_bytes / 1e9,
        "compact_mb": compact_bytes / 1e6,
        "decode_s": decoded - start,
        "align_shard_s": end - decoded,
        "decode_gb_per_s": payload_bytes / 1e9 / (end - start),
        "decode_only_gb_per_s": payload_bytes / 1e9 / (decoded - start),
        "peak_extra_mb": (peak_kib - rss_before) * 1024 / 1e6,
        "peak_mem_ratio": (peak_kib - rss_before) * 1024 / compact_bytes,
        "checksum": checksum,
    }


def bench_replay_overhead(args) -> dict:
    """Wall time of a replayed SAPO training step vs a live-routed one on the tiny MoE.

    One process (a world of one), the ``tiny-moe`` preset, ``--step-samples`` samples of
    ``--step-tokens`` tokens in 2 microbatches, forward + backward + Adam update. The routes
    replayed are the model's own, recorded in an R2 pass (realistic ids, and the same work
    downstream of the router, so the difference is the replay machinery itself). Live and
    replayed steps alternate, after warm-up, and the medians are compared.
    """
    import dataclasses
    import statistics

    from sapo_megatron.step import (
        PolicyLossSpec, assign_step_weights, build_model_chunks, build_optimizer, collate_padded,
        collect_log_probs, run_step,
    )
    from sapo_megatron.step.synthetic import synthetic_samples
    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.routing import attach_routes, attach_routing_replay, recorded_sample_routes, routing_action

    torch.set_num_threads(1)
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, seed=0)
    model_cfg = preset("tiny-moe")
    chunks = build_model_chunks(model_cfg, parallel)
    attach_routing_replay(chunks[0], model_cfg.moe_layer_pattern())
    optimizer = build_optimizer(chunks, lr=1e-9)
    samples = synthetic_samples(args.step_samples, vocab_size=model_cfg.vocab_size, seed=0,
                                min_length=args.step_tokens // 2, max_length=args.step_tokens)
    half = len(samples) // 2
    groups = [samples[:half], samples[half:]]
    live = [collate_padded(g, min_length=args.step_tokens) for g in groups]
    with routing_action(chunks, "record", with_backward=False):
        collect_log_probs(chunks, live)
        recorded = recorded_sample_routes(chunks, live)
    routed = [dataclasses.replace(s, routes=r.to(storage_dtype(model_cfg.num_experts))) for s, r in zip(samples, recorded)]
    replay = [attach_routes(mb, g) for mb, g in zip(live, (routed[:half], routed[half:]))]
    live = assign_step_weights(live, "seq_mean_token_mean")
    replay = assign_step_weights(replay, "seq_mean_token_mean")
    spec = PolicyLossSpec()

    def timed(mbs, action):
        start = time.perf_counter()
        with routing_action(chunks, action, with_backward=True):
            run_step(chunks, mbs, spec, optimizer=optimizer)
        return time.perf_counter() - start

    for _ in range(3):
        timed(live, None), timed(replay, "replay")
    t_live, t_replay = [], []
    for _ in range(args.step_repeats):
        t_live.append(timed(live, None))
        t_replay.append(timed(replay, "replay"))
    live_s, replay_s = statistics.median(t_live), statistics.median(t_replay)
    return {"live_step_s": live_s, "replay_step_s": replay_s, "replay_step_overhead": replay_s / live_s - 1}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tp", type=int, default=2, help="sequence-parallel shard of TP rank 0")
    parser.add_argument("--pp", type=int, default=2, help="MoE layers of pipeline stage 0")
    parser.add_argument("--step-samples", type=int, default=16)
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument("--step-repeats", type=int, default=30)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = bench_pipeline(args)
    print(
        f"pipeline: {args.samples} samples x {args.tokens} tokens, {args.layers} layers, "
        f"top-{args.topk} of {args.experts}: {result['payload_gb']:.3f} GB int32 payload, "
        f"{result['compact_mb']:.1f} MB compact"
    )
    print(
        f"  decode+validate+compact {result['decode_s']:.3f} s "
        f"({result['decode_only_gb_per_s']:.2f} GB/s), align+shard {result['align_shard_s']:.3f} s,"
        f" peak extra RSS {result['peak_extra_mb']:.1f} MB"
    )
    step = bench_replay_overhead(args)
    print(
        f"tiny-moe step ({args.step_samples} samples x <= {args.step_tokens} tokens, fwd+bwd+Adam): "
        f"live {step['live_step_s'] * 1e3:.1f} ms, replayed {step['replay_step_s'] * 1e3:.1f} ms (medians of "
        f"{args.step_repeats})"
    )
    print(
        f"decode_gb_per_s={result['decode_gb_per_s']:.2f} "
        f"peak_mem_ratio={result['peak_mem_ratio']:.2f} "
        f"replay_step_overhead={step['replay_step_overhead']:.4f}"
    )


if __name__ == "__main__":
    main()
