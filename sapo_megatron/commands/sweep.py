"""``sapo-megatron sweep``, the small-scale evidence grid: SAPO vs GRPO vs GSPO, tau asymmetry, routing replay on/off.

One command runs every arm x seed on the CPU demo task, each as its own 2-rank torchrun job
(``examples/run_tiny_cpu.sh`` with overrides), then writes the table of final rewards and the
figures, all from the runs' ``metrics.jsonl``::

    sapo-megatron sweep --out runs/ablations            # run + report
    sapo-megatron sweep --out runs/ablations --dry-run  # print the commands
    sapo-megatron sweep --out runs/ablations --report-only

(``python examples/ablations/sweep.py`` takes the same arguments.) The runs use the source
checkout's ``examples/run_tiny_cpu.sh`` and ``configs/tiny_cpu.yaml``, found next to the package.

Every run is seeded (``seed=N``) and skipped when its ``metrics.jsonl`` already has all steps,
so an interrupted sweep resumes where it stopped. Off-policy pressure: 4 minibatch updates per
rollout batch, so ratios move away from 1 within a step. The grid is three families sharing a
baseline (SAPO, tau 1.0 / 1.05, R3); budget on the 2-core machine: ~1 minute per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: sapo_megatron/commands/sweep.py
BASE = [
    "run.steps=60",
    "run.save_every=1000",
    "run.tensorboard=false",
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=8",
    "train.updates_per_rollout=4",
    "train.micro_batch_size=16",
]
FINAL_WINDOW = 10  # "final reward" = mean reward of the last 10 steps of a run


@dataclass(frozen=True)
class Arm:
    family: str
    name: str
    overrides: tuple[str, ...] = field(default_factory=tuple)


BASELINE = ("loss.type=sapo", "loss.tau_pos=1.0", "loss.tau_neg=1.05", "routing.mode=R3")

ARMS = [
    # Losses (GSPO with its paper's sequence-level clip range).
    Arm("loss", "sapo", BASELINE),
    Arm("loss", "sapo_seq", ("loss.type=sapo_seq", "routing.mode=R3")),
    Arm("loss", "grpo", ("loss.type=grpo", "loss.eps_clip=0.2", "loss.eps_clip_high=0.28", "routing.mode=R3")),
    Arm("loss", "gspo", ("loss.type=gspo", "loss.eps_clip=3e-4", "loss.eps_clip_high=4e-4",
                         "loss.reduction=seq_mean_token_mean", "routing.mode=R3")),
    # Temperatures (tau_pos, tau_neg).
    Arm("tau", "tau_1.0_1.05", BASELINE),
    Arm("tau", "tau_1.05_1.0", ("loss.type=sapo", "loss.tau_pos=1.05", "loss.tau_neg=1.0", "routing.mode=R3")),
    Arm("tau", "tau_1.0_1.0", ("loss.type=sapo", "loss.tau_pos=1.0", "loss.tau_neg=1.0", "routing.mode=R3")),
    Arm("tau", "tau_0.5_0.5", ("loss.type=sapo", "loss.tau_pos=0.5", "loss.tau_neg=0.5", "routing.mode=R3")),
    Arm("tau", "tau_2.0_2.0", ("loss.type=sapo", "loss.tau_pos=2.0", "loss.tau_neg=2.0", "routing.mode=R3")),
    # Routing replay.
    Arm("routing", "R3", BASELINE),
    Arm("routing", "R2", ("loss.type=sapo", "loss.tau_pos=1.0", "loss.tau_neg=1.05", "routing.mode=R2")),
    Arm("routing", "none", ("loss.type=sapo", "loss.tau_pos=1.0", "loss.tau_neg=1.05", "routing.mode=none")),
]


def unique_runs(arms: list[Arm]) -> dict[tuple[str, ...], Arm]:
    """Arms with identical overrides run once (the baseline appears in every family)."""
    runs: dict[tuple[str, ...], Arm] = {}
    for arm in arms:
        runs.setdefault(arm.overrides, arm)
    return runs


def seed_dir(out: Path, arm: Arm, seed: int) -> Path:
    """Where a run lives; arms equal to the baseline share the baseline's runs."""
    name = "baseline" if arm.overrides == BASELINE else arm.name
    return out / "runs" / name / f"seed{seed}"


def command(out: Path, arm: Arm, seed: int) -> list[str]:
    return ["bash", str(ROOT / "examples" / "run_tiny_cpu.sh"), f"output_dir={seed_dir(out, arm, seed)}",
            f"seed={seed}", *BASE, *arm.overrides]


def steps_of(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def expected_steps() -> int:
    return int(next(o for o in BASE if o.startswith("run.steps=")).split("=")[1])


def run_all(out: Path, seeds: list[int], *, dry_run: bool) -> None:
    jobs = [(arm, seed) for arm in unique_runs(ARMS).values() for seed in seeds]
    for i, (arm, seed) in enumerate(jobs, 1):
        cmd = command(out, arm, seed)
        done = len(steps_of(seed_dir(out, arm, seed) / "metrics.jsonl")) >= expected_steps()
        print(f"[{i}/{len(jobs)}] {arm.name} seed {seed}{' (done)' if done else ''}: {' '.join(cmd)}", flush=True)
        if dry_run or done:
            continue
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"run {arm.name} seed {seed} failed (exit {proc.returncode})")


def final_reward(rows: list[dict]) -> float:
    return statistics.mean(r["reward_mean"] for r in rows[-FINAL_WINDOW:])


def table(out: Path, seeds: list[int]) -> str:
    """Markdown: final reward mean +- std over seeds, and late-training diagnostics, per arm."""
    lines = [
        "| family | arm | final reward (mean +- std, n) | max ratio (last 10) | low-weight / clip frac | routing agreement |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        finals, ratios, lows, agree = [], [], [], []
        for seed in seeds:
            rows = steps_of(seed_dir(out, arm, seed) / "metrics.jsonl")
            if len(rows) < expected_steps():
                continue
            tail = rows[-FINAL_WINDOW:]
            finals.append(final_reward(rows))
            ratios.append(statistics.mean(r["ratio_max"] for r in tail))
            lows.append(statistics.mean(r.get("low_weight_frac", 0.0) for r in tail))
            if "routing/agreement_mean" in tail[0]:
                agree.append(statistics.mean(r["routing/agreement_mean"] for r in tail))
        if not finals:
            lines.append(f"| {arm.family} | {arm.name} | (not run) | | | |")
            continue
        std = statistics.stdev(finals) if len(finals) > 1 else math.nan
        agreement = f"{statistics.mean(agree):.3f}" if agree else "live routing"
        lines.append(
            f"| {arm.family} | {arm.name} | {statistics.mean(finals):.3f} +- {std:.3f} ({len(finals)}) | "
            f"{statistics.mean(ratios):.3f} | {statistics.mean(lows):.3f} | {agreement} |"
        )
    return "\n".join(lines)


def figures(out: Path, seeds: list[int]) -> None:
    """One folder of plots per family: seeds averaged per arm (mean +- std band)."""
    for family in sorted({a.family for a in ARMS}):
        files, labels = [], []
        for arm in (a for a in ARMS if a.family == family):
            for seed in seeds:
                path = seed_dir(out, arm, seed) / "metrics.jsonl"
                if path.exists():
                    files.append(str(path))
                    labels.append(arm.name)
        if files:
            from sapo_megatron.commands import plot

            code = plot.main([*files, "--label", *labels, "--group-by", "label", "--out",
                              str(out / "figures" / family)], prog="sapo-megatron plot")
            if code not in (0, 1):  # 1: no known metrics in these files, nothing to draw
                raise SystemExit(f"plotting the {family} family failed (exit {code})")


EPILOG = """examples:
  sapo-megatron sweep --out runs/ablations --dry-run       # print the 30 run commands
  sapo-megatron sweep --out runs/ablations --seeds 0 1 2   # run (resumable) + table + figures
  sapo-megatron sweep --out runs/ablations --report-only   # table.md and figures/ from existing runs"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="The SAPO / GRPO / GSPO, tau and routing-replay "
                                 "ablation grid on the CPU demo task.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dry-run", action="store_true", help="print the run commands only")
    ap.add_argument("--report-only", action="store_true", help="table and figures from existing runs")
    return ap


def main(argv=None, prog: str | None = None) -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.report_only and not (ROOT / "examples" / "run_tiny_cpu.sh").is_file():
        print(f"{ap.prog}: needs a source checkout: {ROOT / 'examples' / 'run_tiny_cpu.sh'} does not exist "
              "(install with pip install -e . from the repository)", file=sys.stderr)
        return 2
    if not args.report_only:
        run_all(out, args.seeds, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    report = table(out, args.seeds)
    (out / "table.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report + "\n")
    print(report)
    figures(out, args.seeds)
    return 0
