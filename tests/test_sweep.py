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


EXPECTED_ARMS = [
    ("loss", "sapo"), ("loss", "sapo_seq"), ("loss", "grpo"), ("loss", "gspo"),
    ("tau", "tau_1.0_1.05"), ("tau", "tau_1.05_1.0"), ("tau", "tau_1.0_1.0"), ("tau", "tau_0.5_0.5"),
    ("tau", "tau_2.0_2.0"),
    ("routing", "R3"), ("routing", "R2"), ("routing", "none"),
]
# The baseline (sapo, tau 1.0/1.05, R3) appears once per family and runs once.
EXPECTED_RUNS = ["sapo", "sapo_seq", "grpo", "gspo", "tau_1.05_1.0", "tau_1.0_1.0", "tau_0.5_0.5",
                 "tau_2.0_2.0", "R2", "none"]


def test_grid_is_exactly_the_expected_arms_and_shares_the_baseline():
    assert [(a.family, a.name) for a in sweep.ARMS] == EXPECTED_ARMS
    assert [a.name for a in sweep.unique_runs(sweep.ARMS).values()] == EXPECTED_RUNS
    baseline = {a.name for a in sweep.ARMS if a.overrides == sweep.BASELINE}
    assert baseline == {"sapo", "tau_1.0_1.05", "R3"}


def _resolved(arm, seed: int = 0, out: Path = Path("/tmp/sweep")):
    """The config an arm's command trains with: configs/tiny_cpu.yaml + its overrides, validated."""
    from sapo_megatron.config import load_config, validate_for_world

    cmd = sweep.command(out, arm, seed)
    assert cmd[:2] == ["bash", str(ROOT / "examples" / "run_tiny_cpu.sh")]
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", cmd[2:])
    validate_for_world(cfg, world_size=2)  # the demo's 2 ranks
    return cfg


def test_every_arm_trains_what_its_name_says():
    """Each arm's overrides reach the config it runs with (a peer's tau override never reached
    its loss): the loss arms set their loss, the tau arms both taus, the routing arms the mode;
    everything else is the baseline's."""
    for arm in sweep.ARMS:
        cfg = _resolved(arm)
        loss, taus, mode = cfg.loss.type, (cfg.loss.tau_pos, cfg.loss.tau_neg), cfg.routing.mode
        if arm.family == "loss":
            assert (loss, mode) == (arm.name, "R3"), arm.name
        elif arm.family == "tau":
            want = tuple(float(t) for t in arm.name.split("_")[1:])
            assert (loss, taus, mode) == ("sapo", want, "R3"), arm.name
        else:
            assert (loss, taus, mode) == ("sapo", (1.0, 1.05), arm.name), arm.name
        assert cfg.run.steps == sweep.expected_steps() == 60 and cfg.train.updates_per_rollout == 4
    grpo = _resolved(next(a for a in sweep.ARMS if a.name == "grpo")).loss
    assert (grpo.eps_clip, grpo.eps_clip_high) == (0.2, 0.28)


def test_every_run_has_its_own_seeded_output_dir(tmp_path):
    seen = {}
    for arm in sweep.unique_runs(sweep.ARMS).values():
        for seed in (0, 1):
            cfg = _resolved(arm, seed, tmp_path)
            assert cfg.run.seed == seed
            seen[(arm.name, seed)] = cfg.run.output_dir
    assert len(set(seen.values())) == len(seen) == 20, "two runs would write to one directory"


def test_commands_are_seeded_and_resume(tmp_path, capsys):
    sweep.run_all(tmp_path, [0, 1], dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and all("seed=" in line and "run_tiny_cpu.sh" in line for line in lines)
    printed = [line.split("]", 1)[1].split(":", 1)[0].strip() for line in lines]
    assert printed == [f"{name} seed {seed}" for name in EXPECTED_RUNS for seed in (0, 1)]
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
