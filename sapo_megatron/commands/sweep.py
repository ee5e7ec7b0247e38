"""``sapo-megatron sweep``, the small-scale evidence grid: SAPO vs GRPO vs GSPO, tau asymmetry,
routing replay, under real off-policy pressure and a rollout engine that differs from the trainer.

One command runs every arm x seed on the CPU demo task, each as its own 2-rank torchrun job
(``configs/ablation_cpu.yaml`` + the arm's overrides), then writes the table and the figures,
all from the runs' ``metrics.jsonl``::

    sapo-megatron sweep --out runs/ablations            # run + report
    sapo-megatron sweep --out runs/ablations --dry-run  # print the commands
    sapo-megatron sweep --out runs/ablations --report-only

(``python examples/ablations/sweep.py`` takes the same arguments.) The config is the source
checkout's ``configs/ablation_cpu.yaml``, found next to the package.

Pressure: 8 minibatch updates per rollout batch, staleness k in {0, 4} (``rollout.max_staleness``:
the embedded engine samples with the weights of k RL steps ago) and the mismatch engine (bf16
weights and activations, router-logit noise; ``rollout.embedded``). Families share arms with
identical overrides (run once): losses at k=0 and k=4; routing R3 / R2 / none and the tau pairs
at k=4 with SAPO. 14 distinct runs x 3 seeds = 42 runs. Budget on the 2-core machine: ~1 minute
per run, ~40 minutes in all. Measured as a ratio under one load (other jobs running): a 30-step
run of this grid (sapo_k4) took 133 s between two runs of the previous grid's baseline (138 s and
123 s), whose 30-run grid took ~25 minutes (~50 s per run) on the quiet machine; so ~51 s at 30
steps, ~58 s at the 36 steps used.

Columns of ``table.md`` are means over a run's last 10 steps, then over seeds; the per-update
loss statistics (ratio, gate, clip) are those of each step's last minibatch, the most off-policy.

Every run is seeded (``seed=N``) and skipped when its ``metrics.jsonl`` already has all steps,
so an interrupted sweep resumes where it stopped.
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
CONFIG = ROOT / "configs" / "ablation_cpu.yaml"
NPROC = 2
# Fixed by configs/ablation_cpu.yaml; repeated here so the table knows when a run is complete.
STEPS = 36
BASE = [f"run.steps={STEPS}"]
FINAL_WINDOW = 10  # "final reward" = mean reward of the last 10 steps of a run
HIGH_K = 4  # the highest staleness: where the routing and tau families run


@dataclass(frozen=True)
class Arm:
    family: str
    name: str
    overrides: tuple[str, ...] = field(default_factory=tuple)


def sapo(k: int = HIGH_K, mode: str = "R3", tau: tuple[float, float] = (1.0, 1.05)) -> tuple[str, ...]:
    """A SAPO arm's overrides, in one canonical order (so equal arms share their runs)."""
    return ("loss.type=sapo", f"loss.tau_pos={tau[0]}", f"loss.tau_neg={tau[1]}", f"routing.mode={mode}",
            f"rollout.max_staleness={k}")


def _loss(k: int) -> list[Arm]:
    staleness = f"rollout.max_staleness={k}"
    return [
        Arm("loss", f"sapo_k{k}", sapo(k)),
        Arm("loss", f"sapo_seq_k{k}", ("loss.type=sapo_seq", "routing.mode=R3", staleness)),
        # GRPO with clip-higher (DAPO's asymmetric range).
        Arm("loss", f"grpo_k{k}", ("loss.type=grpo", "loss.eps_clip=0.2", "loss.eps_clip_high=0.28",
                                   "routing.mode=R3", staleness)),
        # GSPO with its paper's sequence-level clip range.
        Arm("loss", f"gspo_k{k}", ("loss.type=gspo", "loss.eps_clip=3e-4", "loss.eps_clip_high=4e-4",
                                   "loss.reduction=seq_mean_token_mean", "routing.mode=R3", staleness)),
    ]


BASELINE = sapo()  # SAPO, tau 1.0 / 1.05, R3, k = 4: in every family
TAUS = [(1.0, 1.05), (1.05, 1.0), (1.0, 1.0), (0.5, 0.5), (2.0, 2.0)]
ARMS = [
    *_loss(0),
    *_loss(HIGH_K),
    *[Arm("tau", f"tau_{p}_{n}", sapo(tau=(p, n))) for p, n in TAUS],
    *[Arm("routing", mode, sapo(mode=mode)) for mode in ("R3", "R2", "none")],
]


def unique_runs(arms: list[Arm]) -> dict[tuple[str, ...], Arm]:
    """Arms with identical overrides run once (the baseline appears in every family)."""
    runs: dict[tuple[str, ...], Arm] = {}
    for arm in arms:
        runs.setdefault(arm.overrides, arm)
    return runs


def seed_dir(out: Path, arm: Arm, seed: int) -> Path:
    """Where a run lives: named after the first arm with its overrides (shared arms share it)."""
    return out / "runs" / unique_runs(ARMS).get(arm.overrides, arm).name / f"seed{seed}"


def command(out: Path, arm: Arm, seed: int) -> list[str]:
    """The run's torchrun command (``python -m torch.distributed.run``: the interpreter running us)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
            "-m", "sapo_megatron.cli", "train", "--config", str(CONFIG),
            f"run.output_dir={seed_dir(out, arm, seed)}", f"run.seed={seed}", *BASE, *arm.overrides]


def steps_of(metrics: Path) -> list[dict]:
    """A run's RL steps (the supervised cold-start rows, ``phase: cold_start``, are not RL steps)."""
    if not metrics.exists():
        return []
    rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return [r for r in rows if r.get("phase", "rl") == "rl"]


def expected_steps() -> int:
    return STEPS


def run_all(out: Path, seeds: list[int], *, dry_run: bool) -> None:
    jobs = [(arm, seed) for arm in unique_runs(ARMS).values() for seed in seeds]
    for i, (arm, seed) in enumerate(jobs, 1):
        cmd = command(out, arm, seed)
        done = len(steps_of(seed_dir(out, arm, seed) / "metrics.jsonl")) >= expected_steps()
        print(f"[{i}/{len(jobs)}] {arm.name} seed {seed}{' (done)' if done else ''}: {' '.join(cmd)}", flush=True)
        if dry_run or done:
            continue
        # Two ranks on two cores: one thread each, or they fight over the cores. The checkout
        # first on the path, as examples/run_tiny_cpu.sh runs it from there.
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"run {arm.name} seed {seed} failed (exit {proc.returncode})")


def final_reward(rows: list[dict]) -> float:
    return statistics.mean(r["reward_mean"] for r in rows[-FINAL_WINDOW:])


def collapsed(rows: list[dict]) -> bool:
    """Collapse: a non-finite loss at any step, or a final reward (mean of the last 10 steps)
    below half the run's peak 10-step mean reward (a run that learned, then lost it)."""
    if any(not math.isfinite(r.get("loss", 0.0)) for r in rows):
        return True
    rewards = [r["reward_mean"] for r in rows]
    windows = [statistics.mean(rewards[i : i + FINAL_WINDOW]) for i in range(len(rewards) - FINAL_WINDOW + 1)]
    return bool(windows) and windows[-1] < 0.5 * max(windows)


def _tail_mean(tail: list[dict], key: str) -> float | None:
    values = [r[key] for r in tail if key in r]
    return statistics.mean(values) if values else None


# Late-training diagnostics in the table: (column, metrics.jsonl key); mean over the last 10 steps,
# then over seeds. "-" where an arm does not log the key (a clip fraction for SAPO, ...).
COLUMNS = [
    ("exact frac", "exact_frac"),
    ("low-weight frac", "low_weight_frac"),
    ("clip frac", "clip_frac"),
    ("ratio max", "ratio_max"),
    ("ratio min", "ratio_min"),
    ("logprob gap", "train_rollout_logprob_abs_diff"),
    ("gap, live routing", "train_rollout_logprob_abs_diff_live"),
    ("route agree (no replay)", "routing/live_agreement_mean"),
    ("tokens differing >= 1 layer", "routing/live_token_differ_frac"),
    ("route agree (replay)", "routing/agreement_mean"),
    ("grad norm", "grad_norm"),
]


def _runs(out: Path, arm: Arm, seeds: list[int]) -> list[list[dict]]:
    runs = [steps_of(seed_dir(out, arm, seed) / "metrics.jsonl") for seed in seeds]
    return [rows for rows in runs if len(rows) >= expected_steps()]


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" if values else "-"


def table(out: Path, seeds: list[int]) -> str:
    """Markdown: final reward mean +- std over seeds, collapse rate and late-training
    diagnostics per arm; then per-MoE-layer routing agreement without replay."""
    head = ["family", "arm", "final reward (mean +- std, n)", "collapsed", *(c for c, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    layers: list[str] = []
    layer_rows = []
    for arm in ARMS:
        runs = _runs(out, arm, seeds)
        if not runs:
            lines.append(f"| {arm.family} | {arm.name} | (not run) |" + " |" * (len(head) - 3))
            continue
        finals = [final_reward(rows) for rows in runs]
        std = statistics.stdev(finals) if len(finals) > 1 else math.nan
        cells = []
        for _, key in COLUMNS:
            cells.append(_cell([v for rows in runs if (v := _tail_mean(rows[-FINAL_WINDOW:], key)) is not None]))
        lines.append(f"| {arm.family} | {arm.name} | {statistics.mean(finals):.3f} +- {std:.3f} ({len(finals)}) | "
                     f"{sum(map(collapsed, runs))}/{len(runs)} | " + " | ".join(cells) + " |")
        keys = sorted({k for rows in runs for k in rows[-1] if k.startswith("routing/live_agreement_moe")},
                      key=lambda k: int(k.rsplit("moe", 1)[1]))
        layers = layers or keys
        layer_rows.append((arm, [_cell([v for rows in runs if (v := _tail_mean(rows[-FINAL_WINDOW:], k)) is not None])
                                 for k in layers]))
    if layers:
        lines += ["", "Routing agreement without replay per MoE layer (engine routes vs the trainer's live routes, "
                  f"last {FINAL_WINDOW} steps):", "",
                  "| family | arm | " + " | ".join(f"MoE layer {k.rsplit('moe', 1)[1]}" for k in layers) + " |",
                  "|---|---|" + "---|" * len(layers)]
        lines += [f"| {arm.family} | {arm.name} | " + " | ".join(cells) + " |" for arm, cells in layer_rows]
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
  sapo-megatron sweep --out runs/ablations --dry-run       # print the 42 run commands
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
    if not args.report_only and not CONFIG.is_file():
        print(f"{ap.prog}: needs a source checkout: {CONFIG} does not exist "
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
