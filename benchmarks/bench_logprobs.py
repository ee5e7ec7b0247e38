"""Peak extra memory and time of chunked vocab_parallel_log_probs vs naive float32 log_softmax, on CPU.

Both variants compute per-token log-probs AND entropy for logits [tokens, vocab] (float32,
requires_grad) and run forward + backward of ``(logp * g1 + entropy * g2).sum()``:

* naive: ``logp_NV = torch.log_softmax(logits.float() / T, -1)`` (no division at T = 1, so no
  extra copy of float32 logits); ``logp_NV.gather(...)``;
  entropy ``-(logp_NV.exp() * logp_NV).sum(-1)``; plain autograd.
* ours:  ``vocab_parallel_log_probs(logits, targets, with_entropy=True, chunk_size=...)``.

Each variant runs in a fresh subprocess (so one cannot inherit the other's allocator state).
"Extra" memory is defined as

    peak RSS during one forward+backward  -  RSS just before it  -  bytes of logits.grad

i.e. everything beyond the logits (already resident before the step) and their gradient (which
both variants must produce). Peak RSS is the kernel's VmHWM, reset before each measured step by
writing 5 to /proc/self/clear_refs (falls back to ru_maxrss of the fresh process if the reset is
not available). Time is the best of ``--repeats`` forward+backward steps after one warm-up
step; logits.grad is reset to None before each step so both variants allocate it anew.

Run (full size, ~2.5 GB logits, the naive variant needs ~10 GB more)::

    python benchmarks/bench_logprobs.py                      # vocab 151936, 4096 tokens
    python benchmarks/bench_logprobs.py --vocab 32000 --tokens 256 --repeats 2   # quick
    python benchmarks/bench_logprobs.py --device cuda --dtype bfloat16 --tokens 8192   # one GPU

The last line printed is ``peak_mem_ratio=<ours/naive> speed_ratio=<naive_time/our_time>``; on
CUDA it adds ``ours_ms``, ``hbm_floor_ms`` and ``floor_ratio`` (our fwd+bwd time over the time
the bytes it must move take at 4.0 TB/s: the logits read once forward and once backward, their
gradient written once, ``3 * tokens * vocab * itemsize`` bytes). On CUDA, time is measured with
``torch.cuda.synchronize`` around each step and memory with the allocator's peak
(``max_memory_allocated``) instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


HBM_BYTES_PER_S = 4.0e12  # the floor's bandwidth (H100/H200-class HBM3, ~4 TB/s achievable)


def hbm_floor_s(tokens: int, vocab: int, itemsize: int) -> float:
    """Seconds to read the logits twice (forward, backward) and write their gradient once."""
    return 3 * tokens * vocab * itemsize / HBM_BYTES_PER_S


def _cuda_worker(args, logits, step) -> dict:
    grad_bytes = logits.numel() * logits.element_size()
    times, extras = [], []
    for i in range(args.repeats + 1):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        extras.append(torch.cuda.max_memory_allocated() - before - grad_bytes)
        if i > 0:
            times.append(elapsed)
    return {"variant": args.variant, "time_s": min(times), "times_s": times,
            "extra_mb": max(extras) / 2**20, "grad_mb": grad_bytes / 2**20, "peak_reset": "cuda"}


def _worker(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    logits = torch.randn(args.tokens, args.vocab, device=device).mul_(2.0).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    g_logp, g_ent = torch.randn(args.tokens, device=device), torch.randn(args.tokens, device=device)

    if args.variant == "ours":
        from sapo_megatron.logprobs import vocab_parallel_log_probs

        def step():
            logp, ent = vocab_parallel_log_probs(logits, targets, temperature=args.temperature,
                                                 with_entropy=True, chunk_size=args.chunk)
            (logp * g_logp + ent * g_ent).sum().backward()
    else:
        def step():
            z = logits.float() if args.temperature == 1.0 else logits.float() / args.temperature
            logp_NV = torch.log_softmax(z, -1)
            logp = logp_NV.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            ent = -(logp_NV.exp() * logp_NV).sum(-1)
            (logp * g_logp + ent * g_ent).sum().backward()

    if device.type == "cuda":
        return _cuda_worker(args, logits, step)
    grad_kb = logits.numel() * logits.element_size() // 1024
    times, extras_kb = [], []
    resettable = True
    for i in range(args.repeats + 1):
        logits.grad = None
        before_kb = _status_kb("VmRSS")
        resettable = _reset_peak() and resettable
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        peak_kb = _status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        extras_kb.append(peak_kb - before_kb - grad_kb)
        if i > 0:  # the first step is the warm-up
            times.append(elapsed)
    return {"variant": args.variant, "time_s": min(times), "times_s": times,
            "extra_mb": max(extras_kb) / 1024, "grad_mb": grad_kb / 1024, "peak_reset": resettable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: the library default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (memory: RSS on CPU, allocator peak on CUDA)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="logits dtype (the computation runs in float32 chunks either way)")
    parser.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(_worker(args)))
        return

    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {where}, threads={args.threads or torch.get_num_threads()}, "
          f"logits [{args.tokens}, {args.vocab}] {args.dtype} = {args.tokens * args.vocab * itemsize / 2**20:.0f} MB, "
          f"chunk={args.chunk}, T={args.temperature}")
    results = {}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:5s}: best {r['time_s']:.3f} s (all {', '.join(f'{t:.3f}' for t in r['times_s'])}), "
              f"peak extra {r['extra_mb']:.0f} MB (beyond logits and their {r['grad_mb']:.0f} MB grad; "
              f"peak reset={_peak_name(r['peak_reset'])})")
    mem_ratio = max(results["ours"]["extra_mb"], 0.0) / results["naive"]["extra_mb"]
    speed_ratio = results["naive"]["time_s"] / results["ours"]["time_s"]
    line = f"peak_mem_ratio={mem_ratio:.4f} speed_ratio={speed_ratio:.4f}"
    if args.device.startswith("cuda"):
        floor = hbm_floor_s(args.tokens, args.vocab, itemsize)
        ours = results["ours"]["time_s"]
        line += f" ours_ms={ours * 1e3:.3f} hbm_floor_ms={floor * 1e3:.3f} floor_ratio={ours / floor:.2f}"
    print(line)


def _peak_name(reset) -> str:
    if reset == "cuda":
        return "cuda max_memory_allocated"
    return "VmHWM" if reset else "ru_maxrss"


if __name__ == "__main__":
    main()
