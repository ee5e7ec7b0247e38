"""Peak extra memory and time of our log-prob paths: chunked vs naive log_softmax, fused vs unfused.

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

Fused vs unfused (``--mode fused``, or ``both``, the default, which runs the comparison above
first): from hidden states ``[tokens, H]`` (``--hidden``) and an output weight ``[vocab, H]``,
both ``requires_grad``, log-probs and entropy with the same random upstream gradients:

* unfused: ``logits = hidden @ weight.T`` then ``vocab_parallel_log_probs`` (the trainer with
  ``loss.fused_logprobs: false``: the output layer's logits, then our chunked log-probs);
* fused: ``fused_vocab_parallel_log_probs(hidden, weight, ...)``.

Each times forward-only passes (under ``no_grad``, as the old-log-prob and reference passes run)
and forward + backward steps, best of ``--repeats`` after one warm-up each. "Extra" memory of a
forward + backward step is the peak beyond what it started with and beyond the gradients of
``hidden`` and ``weight`` (both paths must produce them): for unfused, the logits, their
gradient and our workspace; for fused, its blocks and accumulators. ``fused_mem_ratio`` compares
the larger of that and the forward-only pass's extra peak, path against path. Full size (T = 8192, vocab
151936, H = 2048, float32: the unfused step peaks at ~10 GB of logits and gradient over 2.5 GB of
weight and weight gradient, the most this 23 GB machine shared by others leaves; ~15 min on
2 quiet cores)::

    python benchmarks/bench_logprobs.py --mode fused --tokens 8192 --hidden 2048 --repeats 2
    python benchmarks/bench_logprobs.py --mode fused --tokens 512 --hidden 256 --vocab 32000   # quick

The last line printed is then ``fused_mem_ratio=<fused/unfused extra>
fused_fwd_speed_ratio=<unfused/fused forward time> fused_speed_ratio=<unfused/fused
forward+backward time>``; ``--mode both`` prints the chunked-vs-naive line before it.

The chunked-vs-naive line is ``peak_mem_ratio=<ours/naive> speed_ratio=<naive_time/our_time>``; on
CUDA it adds ``ours_ms``, ``hbm_floor_ms`` and ``floor_ratio`` (our fwd+bwd time over the time
the bytes it must move take at 4.0 TB/s: the logits read once forward and once backward, their
gradient written once, ``3 * tokens * vocab * itemsize`` bytes). On CUDA, time is measured with
``torch.cuda.synchronize`` around each step and memory with the allocator's peak
(``max_memory_allocated``) instead of RSS.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _measure(device, step, reset, produced_bytes: int, repeats: int, grad: bool) -> tuple[list[float], float, object]:
    """Best-of timing and peak extra MB of ``step`` after ``reset()`` (``produced_bytes``: the
    gradients it must produce, not counted as extra)."""
    times, extras = [], []
    resettable = True
    for i in range(repeats + 1):
        reset()
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _status_kb("VmRSS") * 1024
            resettable = _reset_peak() and resettable
        t0 = time.perf_counter()
        with ctx:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        extras.append(peak - before - produced_bytes)
        if i > 0:
            times.append(elapsed)
    return times, max(extras) / 2**20, "cuda" if device.type == "cuda" else resettable


def _fused_worker(args) -> dict:
    from sapo_megatron.logprobs import fused_vocab_parallel_log_probs, vocab_parallel_log_probs

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=device).to(dtype).requires_grad_()
    # Logits of a few units, as a trained head gives (std ~2, like the logits-only variants).
    weight = (torch.randn(args.vocab, args.hidden, device=device) * (2.0 / args.hidden**0.5)).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    g_logp, g_ent = torch.randn(args.tokens, device=device), torch.randn(args.tokens, device=device)
    kwargs = dict(temperature=args.temperature, with_entropy=True, chunk_size=args.chunk)

    def log_probs():
        if args.variant == "fused":
            return fused_vocab_parallel_log_probs(hidden, weight, targets, **kwargs)
        return vocab_parallel_log_probs(hidden @ weight.t(), targets, **kwargs)

    def reset():
        hidden.grad = weight.grad = None

    def step():
        logp, ent = log_probs()
        if torch.is_grad_enabled():
            (logp * g_logp + ent * g_ent).sum().backward()

    produced = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    fwd_times, fwd_extra, _ = _measure(device, step, reset, 0, args.repeats, grad=False)
    times, extra, peak_reset = _measure(device, step, reset, produced, args.repeats, grad=True)
    return {"variant": args.variant, "fwd_time_s": min(fwd_times), "fwd_times_s": fwd_times,
            "fwd_extra_mb": fwd_extra, "time_s": min(times), "times_s": times, "extra_mb": extra,
            "grad_mb": produced / 2**20, "peak_reset": peak_reset}


def _run_variant(variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _times(r: dict, key: str) -> str:
    return ", ".join(f"{t:.3f}" for t in r[key])


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
    parser.add_argument("--mode", choices=["both", "logits", "fused"], default="both",
                        help="logits: chunked vs naive; fused: fused vs unfused; both (last line: fused)")
    parser.add_argument("--hidden", type=int, default=1024, help="H of the fused/unfused comparison")
    parser.add_argument("--variant", choices=["ours", "naive", "fused", "unfused"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        worker = _fused_worker if args.variant in ("fused", "unfused") else _worker
        print(json.dumps(worker(args)))
        return

    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {where}, threads={args.threads or torch.get_num_threads()}, "
          f"logits [{args.tokens}, {args.vocab}] {args.dtype} = {args.tokens * args.vocab * itemsize / 2**20:.0f} MB, "
          f"chunk={args.chunk}, T={args.temperature}, mode={args.mode}, hidden={args.hidden}")
    if args.mode in ("both", "logits"):
        _logits_comparison(args, itemsize)
    if args.mode in ("both", "fused"):
        _fused_comparison(args)


def _fused_comparison(args) -> None:
    results = {}
    for variant in ("fused", "unfused"):
        r = results[variant] = _run_variant(variant)
        print(f"{variant:7s}: forward-only best {r['fwd_time_s']:.3f} s (all {_times(r, 'fwd_times_s')}), "
              f"fwd+bwd best {r['time_s']:.3f} s (all {_times(r, 'times_s')}), peak extra {r['extra_mb']:.0f} MB "
              f"fwd+bwd, {r['fwd_extra_mb']:.0f} MB forward-only (beyond the {r['grad_mb']:.0f} MB of "
              f"hidden and weight gradients; peak reset={_peak_name(r['peak_reset'])})")
    fused, unfused = results["fused"], results["unfused"]
    # The peak over both kinds of pass: the fused forward's chunk may outweigh its backward's
    # blocks (the gradients are subtracted only from the forward + backward step).
    peak = {k: max(r["extra_mb"], r["fwd_extra_mb"], 0.0) for k, r in results.items()}
    print(f"fused_mem_ratio={peak['fused'] / peak['unfused']:.4f} "
          f"fused_fwd_speed_ratio={unfused['fwd_time_s'] / fused['fwd_time_s']:.4f} "
          f"fused_speed_ratio={unfused['time_s'] / fused['time_s']:.4f}")


def _logits_comparison(args, itemsize) -> None:
    results = {}
    for variant in ("ours", "naive"):
        r = results[variant] = _run_variant(variant)
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
