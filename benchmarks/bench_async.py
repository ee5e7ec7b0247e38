"""Asynchronous rollouts: trainer steps/s at rollout.max_staleness=0 vs 1, and partial rollouts
(``rollout.partial``) vs drain-before-sync under long-tailed response lengths.

The trainer runs on 2 gloo ranks (TP=2, R3, the tiny HF Qwen3-MoE of the tests) against the
schema-exact SGLang mock (tests/sglang_mock.py). **The mock's tokens/s model:** each request
decodes at a fixed ``1 / delay_per_token_s`` tokens/s, independently of how many run at once (no
batching slowdown, no prefill cost), and stops decoding while paused (``in_place``/``retract``);
so a batch takes its LONGEST request's time. The latency is calibrated so that generation takes
about as long as the rest of a step: a first run at staleness 0 with a tiny latency measures the
non-rollout part of a step (log-prob pass, updates, weight export and load) and the client's own
rollout cost, and sets ``delay_per_token_s = (non-rollout - client cost) / max_new_tokens``.

Part 1 (``--part async``): staleness 0 (rollout + training + sync) vs 1 (the next batch generated
while this step trains, drained before the sync), fixed-length responses.

Part 2 (``--part partial``, the default part too): long-tailed lengths, 90% of responses
``max_new_tokens / 16`` tokens and 10% ``max_new_tokens`` (p99/p50 = 16, the sampled ratio is
printed), latency calibrated so that a long response takes twice the non-rollout step. Drain-
before-sync (``max_staleness=1``) waits for the longest response of every batch; partial
(``partial: true``, ``in_place`` pauses, ``max_staleness=4``, TIS) takes the first complete groups
and lets the long ones generate across updates (their tokens staler than 4 are masked: printed).

Reported: median ``time/step_s`` over the steady steps (the first and the last step excluded) of
two runs per setting, alternated.

    python benchmarks/bench_async.py                  # both parts against the mock, ~6 minutes on 2 cores
    python benchmarks/bench_async.py --part partial --steps 6
    python benchmarks/bench_async.py --real           # partial vs drain once against the REAL CPU
                                                      # SGLang 0.5.23 server (tests/real_sglang venv)

Last lines: ``async_speedup=<x>`` and ``partial_speedup=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = """
run: {{output_dir: {out}, steps: {steps}, save_every: 0, tensorboard: false, progress: false}}
model: {{preset: null, hf_dir: {hf}}}
parallel: {{tensor_model_parallel_size: 2}}
optim: {{lr: 1.0e-4}}
rollout:
  engine: sglang
  prompts_per_step: 4
  samples_per_prompt: 4
  max_new_tokens: {max_new_tokens}
  max_staleness: {k}
  partial: {partial}
  sglang: {{urls: ["{url}"], retries: 1, backoff_s: 0.1, timeout_s: 300, weight_dir: {weights}}}
train: {{micro_batch_size: 2, updates_per_rollout: 4}}
loss: {{tis_cap: 2.0}}
routing: {{mode: R3}}
{task}
"""
TASK = "task: {name: arithmetic}"


def run(tmp: Path, name: str, *, hf, url, k: int, steps: int, max_new_tokens: int, partial: bool = False,
        task: str = TASK, env_extra: dict | None = None) -> list[dict]:
    out = tmp / name
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG.format(out=out, hf=hf, url=url, k=k, steps=steps, max_new_tokens=max_new_tokens,
                                    weights=tmp / f"{name}_weights", partial=str(partial).lower(), task=task))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sapo_megatron.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steady(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[1:-1])


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def lengths_line(lengths: list[int]) -> str:
    p50, p99 = percentile(lengths, 0.5), percentile(lengths, 0.99)
    return f"response lengths: n={len(lengths)} p50={p50:.0f} p99={p99:.0f} p99/p50={p99 / max(p50, 1):.1f}"


def compare_partial(tmp: Path, common: dict, tag: str = "") -> tuple[list[dict], list[dict]]:
    """Drain-before-sync (async, k=1) vs partial (k=4), alternated, two runs each."""
    drain, partial = [], []
    for rep in range(2):
        drain += run(tmp, f"drain{tag}_{rep}", k=1, **common)[1:-1]
        partial += run(tmp, f"partial{tag}_{rep}", k=4, partial=True, **common)[1:-1]
    return drain, partial


def report_partial(drain: list[dict], partial: list[dict]) -> None:
    t0, t1 = median(drain, "time/step_s"), median(partial, "time/step_s")
    print(f"drain-before-sync (max_staleness=1): {1 / t0:.3f} steps/s (median step {t0:.3f}s)")
    print(f"partial (in_place, max_staleness=4): {1 / t1:.3f} steps/s (median step {t1:.3f}s), staleness_mean="
          f"{median(partial, 'async/staleness_mean'):.2f} spanning_frac={median(partial, 'async/spanning_frac'):.2f} "
          f"masked_token_frac={median(partial, 'async/masked_token_frac'):.2f}")
    print(f"partial_speedup={t0 / t1:.3f}")


def main_real(args) -> None:
    """Partial vs drain once against the real SGLang server (CPU, --disable-radix-cache)."""
    from tests.real_sglang.harness import RealServer, ensure_venv, make_tiny_model, write_sum_prompts

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = make_tiny_model(tmp / "model")
        server = RealServer(ensure_venv(), model, log_dir=tmp, args=("--disable-radix-cache",)).start()
        task = ("task: {name: math, path: " + str(write_sum_prompts(tmp / "prompts.jsonl")) + ", format: gsm8k, "
                "options: {tokenizer: " + str(model) + ", verifier: regex}, reward_fn: 'tests.real_sglang.rewards:digits'}")
        try:
            common = dict(hf=model, url=server.url, steps=args.steps, max_new_tokens=args.real_max_new_tokens,
                          task=task)
            drain, partial = compare_partial(tmp, common, "_real")
        finally:
            server.stop()
    lengths = [r["response_len_mean"] for r in drain + partial]
    print(f"real SGLang 0.5.23 (CPU): response_len_mean per step p50={percentile(lengths, 0.5):.1f} "
          f"max={max(lengths):.1f} (max_new_tokens={args.real_max_new_tokens}; lengths follow the model's EOS)")
    report_partial(drain, partial)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=4, help="part async: every response's length")
    ap.add_argument("--tail-max-new-tokens", type=int, default=32, help="part partial: the long responses' length")
    ap.add_argument("--part", choices=("async", "partial", "both"), default="both")
    ap.add_argument("--real", action="store_true", help="partial vs drain against the real CPU SGLang server")
    ap.add_argument("--real-max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if args.real:
        return main_real(args)

    from tests.dist.ckpt_models import make_hf_model
    from tests.sglang_mock import Behaviour, MockSGLang

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf = make_hf_model("qwen3_moe", tmp / "hf")
        behaviour = Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16,
                              delay_per_token_s=0.01, disable_radix_cache=True)
        server = MockSGLang(behaviour)
        try:
            common = dict(hf=hf, url=server.url, steps=args.steps, max_new_tokens=args.max_new_tokens)
            calib = run(tmp, "calibrate", k=0, **common)
            train_s = steady(calib, "time/step_s") - steady(calib, "time/rollout_s")
            # The client's own cost (HTTP, route decoding, the broadcast) is part of generation too.
            overhead_s = steady(calib, "time/rollout_s") - 0.01 * args.max_new_tokens
            if args.part in ("async", "both"):
                behaviour.delay_per_token_s = max(0.0, train_s - overhead_s) / args.max_new_tokens
                # Alternate the two settings (twice each) so that load from other jobs hits both alike.
                sync, overlapped = [], []
                for rep in range(2):
                    sync += run(tmp, f"staleness0_{rep}", k=0, **common)[1:-1]
                    overlapped += run(tmp, f"staleness1_{rep}", k=1, **common)[1:-1]
                t0, t1 = median(sync, "time/step_s"), median(overlapped, "time/step_s")
                print(f"calibration: non-rollout part of a step {train_s:.3f}s, client cost {overhead_s:.3f}s -> "
                      f"delay_per_token_s={behaviour.delay_per_token_s:.3f}; staleness 0: rollout "
                      f"{median(sync, 'time/rollout_s'):.3f}s")
                print(f"max_staleness=0: {1 / t0:.3f} steps/s (median step {t0:.3f}s)")
                print(f"max_staleness=1: {1 / t1:.3f} steps/s (median step {t1:.3f}s), staleness_mean="
                      f"{median(overlapped, 'async/staleness_mean'):.2f} "
                      f"overlap_frac={median(overlapped, 'async/overlap_frac'):.2f}")
                print(f"async_speedup={t0 / t1:.3f}")
            if args.part in ("partial", "both"):
                long = args.tail_max_new_tokens
                behaviour.response_lengths = (max(1, long // 16),) * 9 + (long,)
                behaviour.delay_per_token_s = 2 * max(train_s, 0.05) / long
                start = len(server.served_spans)
                drain, partial = compare_partial(tmp, dict(common, max_new_tokens=long))
                lengths = [spans[-1]["end"] for spans in server.served_spans[start:] if spans]
                print(f"mock tokens/s model: {1 / behaviour.delay_per_token_s:.0f} tokens/s per request, any "
                      f"concurrency, no prefill cost (delay_per_token_s={behaviour.delay_per_token_s:.4f}, a long "
                      f"response = 2 x the non-rollout step {train_s:.3f}s)")
                print(lengths_line(lengths))
                report_partial(drain, partial)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
