#!/usr/bin/env python
"""Train/inference mismatch against a REAL SGLang server, measured by our own trainer.

    python tools/measure_mismatch.py --out /tmp/mm                       # tiny model, launched here
    python tools/measure_mismatch.py --out /tmp/mm --dtype fp32 --cold-start-steps 40
    python tools/measure_mismatch.py --out /tmp/mm --url http://gpu-node:30000 --hf-dir /models/X \\
        --prompts train.jsonl --nproc 8 --tp 4                          # a cluster's server

It runs ``sapo-megatron train`` under torchrun with routing replay R3 for ``--steps`` steps
(after ``--cold-start-steps`` supervised steps on the prompts' reference answers, so the policy's
entropy is realistic; a random model's near-uniform entropy gives only a lower bound) and
summarises the per-step metrics with :func:`sapo_megatron.trainer.mismatch.summarise`: mean
|train - rollout| log-prob per token with and without R3, the share of tokens whose SAPO gate
weight is below 0.5 at ratio = exp(gap), and per-layer routing agreement without replay.

Before training, ``sapo-megatron doctor`` measures the same server with the same config (the same
layout, prompts and step-0 sampling), at the starting weights: its per-token figures (p99, max,
GRPO clip share, by position) are in the summary under ``doctor`` (``--no-doctor`` skips it).
The doctor keeps every token where the trainer keeps sums; both use the gate maths of
``trainer/mismatch.py`` (tests/real_sglang/test_doctor_real.py checks that they agree exactly on
the same tokens).

Without ``--url`` it starts the real SGLang server on this machine's CPU (tests/real_sglang:
its own venv, built once) serving a tiny random Qwen3-MoE in the chosen dtype, so it runs from a
checkout on a laptop. Prints one JSON object; ``--markdown`` adds a table row for docs/sglang.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sapo_megatron.trainer.mismatch import summarise  # noqa: E402

DTYPES = {"bf16": ("bfloat16", "bfloat16"), "fp32": ("float32", "float32")}  # (server --dtype, trainer)


def config(args, url: str, hf_dir: Path, prompts: Path, out: Path) -> dict:
    return {
        "run": {"output_dir": str(out), "steps": args.steps, "save_every": 0, "tensorboard": False, "seed": args.seed},
        "model": {"preset": None, "hf_dir": str(hf_dir), "params_dtype": DTYPES[args.dtype][1]},
        "parallel": {"tensor_model_parallel_size": args.tp},
        "optim": {"lr": args.lr},
        "rollout": {"engine": "sglang", "prompts_per_step": args.prompts_per_step, "samples_per_prompt": 4,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                    "sglang": {"urls": [url], "weight_sync": "disk", "weight_dir": str(out / "weights"),
                               "timeout_s": 300, "retries": 2, "backoff_s": 1.0}},
        "train": {"micro_batch_size": 4, "updates_per_rollout": 1, "cold_start_steps": args.cold_start_steps,
                  "cold_start_lr": args.cold_start_lr},
        "routing": {"mode": "R3"},
        "task": {"name": "math", "path": str(prompts), "format": "gsm8k",
                 "options": {"tokenizer": str(hf_dir), "verifier": "regex"}},
    }


def write_config(cfg: dict, out: Path) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / "mismatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(nproc: int, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "sapo_megatron.cli", *args], check=True, env=env, cwd=ROOT,
                          capture_output=capture, text=True)


def doctor(path: Path, url: str, out: Path, nproc: int) -> dict:
    """``sapo-megatron doctor`` on the run's own config: the step-0 figures, per token."""
    done = torchrun(nproc, "doctor", "--config", str(path), "--url", url, "--out", str(out), "--json", capture=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(path: Path, out: Path, nproc: int) -> list[dict]:
    torchrun(nproc, "train", "--config", str(path))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


#: the doctor's figures kept in the summary (its full report: <out>/doctor/doctor.json).
DOCTOR_KEYS = ("num_tokens", "routing_agreement_mean", "token_differ_frac", "logprob_gap_mean", "logprob_gap_p99",
               "logprob_gap_max", "gate_low_frac", "clip_frac", "verdict")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run directory (metrics.jsonl, summary.json)")
    p.add_argument("--url", help="an SGLang server already serving --hf-dir (default: start one here)")
    p.add_argument("--hf-dir", type=Path, help="the served model (default: a tiny random Qwen3-MoE made here)")
    p.add_argument("--prompts", type=Path, help="gsm8k-format jsonl (default: made-up sums)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="server and trainer precision")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cold-start-steps", type=int, default=0)
    p.add_argument("--cold-start-lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--no-doctor", action="store_true", help="skip sapo-megatron doctor's step-0 measurement")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.prompts is None:
        from sapo_megatron.commands.doctor import write_default_prompts

        args.prompts = write_default_prompts(args.out / "prompts.jsonl", 64)
    prompts = args.prompts
    server = None
    try:
        if args.url:
            if args.hf_dir is None:
                p.error("--url needs --hf-dir: the trainer starts from the weights the server serves")
            url, hf_dir = args.url, args.hf_dir
        else:
            from tests.real_sglang.harness import RealServer, ensure_venv, make_tiny_model

            hf_dir = args.hf_dir or make_tiny_model(args.out / f"tiny-{args.dtype}", dtype=DTYPES[args.dtype][1])
            server = RealServer(ensure_venv(log=lambda m: print(m, file=sys.stderr)), hf_dir, log_dir=args.out,
                                args=("--dtype", DTYPES[args.dtype][0]))
            url = server.start().url
        path = write_config(config(args, url, hf_dir, prompts, args.out / "run"), args.out / "run")
        report = None if args.no_doctor else doctor(path, url, args.out / "doctor", args.nproc)
        rows = train(path, args.out / "run", args.nproc)
    finally:
        if server is not None:
            server.stop()
    figures = {"dtype": args.dtype, "cold_start_steps": args.cold_start_steps, **summarise(rows)}
    if report is not None:
        figures["doctor"] = {k: report[k] for k in DOCTOR_KEYS}
        figures["doctor"]["live"] = {k: report["live"][k] for k in ("logprob_gap_mean", "logprob_gap_p99")}
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    if args.markdown:
        keys = ("logprob_abs_diff_r3", "logprob_abs_diff_live", "gate_low_frac_r3", "gate_low_frac_live",
                "routing_agreement_live", "entropy")
        print("| " + " | ".join([args.dtype, str(args.cold_start_steps)] +
                                [f"{figures[k]:.4g}" if k in figures else "-" for k in keys]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
