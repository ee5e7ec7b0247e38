"""The ablation sweep's plumbing: the grid, the commands, resumption and the report table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep", ROOT / "examples" / "ablations" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep"] = sweep  # dataclasses look their module up there
spec.loader.exec_module(sweep)


def test_grid_covers_the_issue_and_shares_the_baseline():
    names = {a.family: [] for a in sweep.ARMS}
    for arm in sweep.ARMS:
        names[arm.family].append(arm.name)
    assert names["loss"] == ["sapo", "sapo_seq", "grpo", "gspo"]
    assert names["tau"] == ["tau_1.0_1.05", "tau_1.05_1.0", "tau_1.0_1.0", "tau_0.5_0.5", "tau_2.0_2.0"]
    assert names["routing"] == ["R3", "R2", "none"]
    # The baseline appears once per family but runs once.
    assert len(sweep.unique_runs(sweep.ARMS)) == 10


def test_commands_are_seeded_and_resume(tmp_path, capsys):
    sweep.run_all(tmp_path, [0, 1], dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and all("seed=" in line and "run_tiny_cpu.sh" in line for line in lines)
    arm = sweep.ARMS[2]  # grpo
    done = sweep.seed_dir(tmp_path, arm, 0)
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "reward_mean": 0.1}) for i in range(60)))
    sweep.run_all(tmp_path, [0], dry_run=True)
    assert "grpo seed 0 (done)" in capsys.readouterr().out


def _fake(out: Path, arm, seed: int, reward: float) -> None:
    d = sweep.seed_dir(out, arm, seed)
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i, "reward_mean": reward if i >= 50 else 0.0, "ratio_max": 1.5, "low_weight_frac": 0.2,
             "routing/agreement_mean": 0.9} for i in range(60)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_table_reports_mean_and_std_over_seeds(tmp_path):
    grpo = next(a for a in sweep.ARMS if a.name == "grpo")
    _fake(tmp_path, grpo, 0, 0.2)
    _fake(tmp_path, grpo, 1, 0.4)
    report = sweep.table(tmp_path, [0, 1])
    row = next(line for line in report.splitlines() if "| grpo |" in line)
    # Final reward = mean of the last 10 steps: 0.2 and 0.4 -> 0.300 +- 0.141 (sample std).
    assert "0.300 +- 0.141 (2)" in row and "| 1.500 |" in row and "| 0.900 |" in row
    assert "(not run)" in next(line for line in report.splitlines() if "| gspo |" in line)
