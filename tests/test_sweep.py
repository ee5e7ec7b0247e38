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
    ("loss", "sapo_k0"), ("loss", "sapo_seq_k0"), ("loss", "grpo_k0"), ("loss", "gspo_k0"),
    ("loss", "sapo_k4"), ("loss", "sapo_seq_k4"), ("loss", "grpo_k4"), ("loss", "gspo_k4"),
    ("tau", "tau_1.0_1.05"), ("tau", "tau_1.05_1.0"), ("tau", "tau_1.0_1.0"), ("tau", "tau_0.5_0.5"),
    ("tau", "tau_2.0_2.0"),
    ("routing", "R3"), ("routing", "R2"), ("routing", "none"),
]
# The baseline (sapo, tau 1.0/1.05, R3, k=4) appears once per family and runs once, as sapo_k4.
EXPECTED_RUNS = ["sapo_k0", "sapo_seq_k0", "grpo_k0", "gspo_k0", "sapo_k4", "sapo_seq_k4", "grpo_k4", "gspo_k4",
                 "tau_1.05_1.0", "tau_1.0_1.0", "tau_0.5_0.5", "tau_2.0_2.0", "R2", "none"]


def test_grid_is_exactly_the_expected_arms_and_shares_the_baseline():
    assert [(a.family, a.name) for a in sweep.ARMS] == EXPECTED_ARMS
    assert [a.name for a in sweep.unique_runs(sweep.ARMS).values()] == EXPECTED_RUNS
    baseline = {a.name for a in sweep.ARMS if a.overrides == sweep.BASELINE}
    assert baseline == {"sapo_k4", "tau_1.0_1.05", "R3"}
    dirs = {sweep.seed_dir(Path("/o"), a, 0) for a in sweep.ARMS if a.overrides == sweep.BASELINE}
    assert dirs == {Path("/o/runs/sapo_k4/seed0")}, "shared arms share their runs"


def _resolved(arm, seed: int = 0, out: Path = Path("/tmp/sweep")):
    """The config an arm's command trains with: configs/ablation_cpu.yaml + its overrides, validated."""
    from sapo_megatron.config import load_config, validate_for_world

    cmd = sweep.command(out, arm, seed)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    at = cmd.index("--config")
    assert cmd[at + 1] == str(ROOT / "configs" / "ablation_cpu.yaml")
    cfg = load_config(cmd[at + 1], cmd[at + 2:])
    validate_for_world(cfg, world_size=2)  # the grid's 2 ranks
    return cfg


def test_every_arm_trains_what_its_name_says():
    """Each arm's overrides reach the config it runs with (a peer's tau override never reached
    its loss): the loss arms set their loss and staleness, the tau arms both taus, the routing
    arms the mode; everything else is the baseline's, and every arm runs the mismatch engine."""
    for arm in sweep.ARMS:
        cfg = _resolved(arm)
        loss, taus, mode, k = cfg.loss.type, (cfg.loss.tau_pos, cfg.loss.tau_neg), cfg.routing.mode, \
            cfg.rollout.max_staleness
        if arm.family == "loss":
            name, want_k = arm.name.rsplit("_k", 1)
            assert (loss, mode, k) == (name, "R3", int(want_k)), arm.name
        elif arm.family == "tau":
            want = tuple(float(t) for t in arm.name.split("_")[1:])
            assert (loss, taus, mode, k) == ("sapo", want, "R3", 4), arm.name
        else:
            assert (loss, taus, mode, k) == ("sapo", (1.0, 1.05), arm.name, 4), arm.name
        assert cfg.run.steps == sweep.expected_steps() and cfg.train.updates_per_rollout == 8
        assert (cfg.rollout.embedded.dtype, cfg.rollout.embedded.router_noise_std) == ("bf16", 0.06)
    grpo = _resolved(next(a for a in sweep.ARMS if a.name == "grpo_k4")).loss
    assert (grpo.eps_clip, grpo.eps_clip_high) == (0.2, 0.28)


def test_every_run_has_its_own_seeded_output_dir(tmp_path):
    seen = {}
    for arm in sweep.unique_runs(sweep.ARMS).values():
        for seed in (0, 1):
            cfg = _resolved(arm, seed, tmp_path)
            assert cfg.run.seed == seed
            seen[(arm.name, seed)] = cfg.run.output_dir
    assert len(set(seen.values())) == len(seen) == 28, "two runs would write to one directory"


def test_commands_are_seeded_and_resume(tmp_path, capsys):
    sweep.run_all(tmp_path, [0, 1], dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 28 and all("run.seed=" in line and "ablation_cpu.yaml" in line for line in lines)
    printed = [line.split("]", 1)[1].split(":", 1)[0].strip() for line in lines]
    assert printed == [f"{name} seed {seed}" for name in EXPECTED_RUNS for seed in (0, 1)]
    arm = sweep.ARMS[2]  # grpo_k0
    done = sweep.seed_dir(tmp_path, arm, 0)
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "reward_mean": 0.1}) for i in range(sweep.STEPS)))
    sweep.run_all(tmp_path, [0], dry_run=True)
    assert "grpo_k0 seed 0 (done)" in capsys.readouterr().out


def _fake(out: Path, arm, seed: int, reward: float, *, peak: float = 0.0, loss: float = 0.5) -> None:
    d = sweep.seed_dir(out, arm, seed)
    d.mkdir(parents=True, exist_ok=True)
    n = sweep.STEPS
    rows = [{"step": i, "reward_mean": reward if i >= n - 10 else (peak if 5 <= i < 15 else 0.0), "loss": loss,
             "ratio_max": 1.5, "low_weight_frac": 0.2, "routing/agreement_mean": 0.9,
             "routing/live_agreement_mean": 0.8, "routing/live_agreement_moe0": 0.7,
             "routing/live_agreement_moe1": 0.9} for i in range(n)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_table_reports_mean_and_std_over_seeds(tmp_path):
    grpo = next(a for a in sweep.ARMS if a.name == "grpo_k4")
    _fake(tmp_path, grpo, 0, 0.2)
    _fake(tmp_path, grpo, 1, 0.4)
    report = sweep.table(tmp_path, [0, 1])
    row = next(line for line in report.splitlines() if "| grpo_k4 |" in line)
    # Final reward = mean of the last 10 steps: 0.2 and 0.4 -> 0.300 +- 0.141 (sample std).
    assert "0.300 +- 0.141 (2) | 0/2 |" in row and "| 1.500 |" in row and "| 0.900 |" in row and "| 0.800 |" in row
    assert "(not run)" in next(line for line in report.splitlines() if "| gspo_k4 |" in line)
    # The per-layer table: one column per MoE layer.
    layer_row = [line for line in report.splitlines() if "| grpo_k4 |" in line][1]
    assert layer_row == "| loss | grpo_k4 | 0.700 | 0.900 |"


def test_collapse_definition(tmp_path):
    """Collapsed = final 10-step reward < half the peak 10-step mean, or a non-finite loss."""
    rows = lambda final, peak, loss=0.5: [  # noqa: E731
        {"reward_mean": final if i >= sweep.STEPS - 10 else (peak if i < 10 else 0.0), "loss": loss}
        for i in range(sweep.STEPS)]
    assert sweep.collapsed(rows(0.1, 0.5))  # 0.1 < 0.25
    assert not sweep.collapsed(rows(0.3, 0.5))  # 0.3 >= 0.25
    assert not sweep.collapsed(rows(0.0, 0.0))  # never learned: not a collapse
    assert sweep.collapsed(rows(0.3, 0.3, loss=float("nan")))
    arm = next(a for a in sweep.ARMS if a.name == "R2")
    _fake(tmp_path, arm, 0, 0.1, peak=0.9)
    _fake(tmp_path, arm, 1, 0.5, peak=0.5)
    row = next(line for line in sweep.table(tmp_path, [0, 1]).splitlines() if "| R2 |" in line)
    assert "| 1/2 |" in row
