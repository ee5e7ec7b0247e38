"""``sapo-megatron plot`` (and its wrapper tools/plot_metrics.py): PNGs from a metrics JSONL,
overlays, seed groups, clear input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import clean_env

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, steps: int = 6, offset: float = 0.0, routing: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for step in range(steps):
            row = {"step": step, "reward_mean": 0.1 * step + offset, "gate_mean_pos": 0.9, "gate_mean_neg": 0.8,
                   "low_weight_frac": 0.01, "ratio_min": 0.9, "ratio_mean": 1.0, "ratio_max": 1.1,
                   "train_rollout_logprob_abs_diff": 0.02, "grad_norm": 1.5, "loss": -0.1}
            if routing:
                row["routing/agreement_mean"] = 0.97
            if step == 2:
                del row["grad_norm"]  # a missing value leaves a gap, not an error
            f.write(json.dumps(row) + "\n")
    return path


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=clean_env())


@pytest.mark.slow  # matplotlib in a subprocess per call
def test_pngs_written(tmp_path):
    run = write_run(tmp_path / "run" / "metrics.jsonl", routing=False)
    result = run_tool(run, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    written = {Path(line).name for line in result.stdout.split()}
    # No routing or entropy keys in this file: those panels are skipped.
    assert written == {"reward.png", "sapo_gate.png", "logprob_diff.png", "ratio.png", "grad_norm.png", "loss.png"}
    for name in written:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.slow  # matplotlib in this process
def test_exact_frac_and_cold_start_panels(tmp_path):
    from sapo_megatron.commands.plot import plot

    rows = [{"step": 0, "phase": "cold_start", "sft_loss": 2.7}, {"step": 1, "phase": "rl", "loss": -0.1,
                                                                   "reward_mean": 0.2, "exact_frac": 0.1}]
    written = {p.name for p in plot([("demo", rows)], tmp_path, grouped=False)}
    assert written == {"reward.png", "exact_frac.png", "loss.png"}  # the cold-start NLL joins the loss panel


@pytest.mark.slow  # matplotlib in a subprocess per call
def test_overlay_and_group_by_seed(tmp_path):
    files = [write_run(tmp_path / arm / f"seed{s}" / "metrics.jsonl", offset=0.05 * s + (arm == "grpo"))
             for arm in ("sapo", "grpo") for s in range(2)]
    result = run_tool(*files, "--out", tmp_path / "grouped", "--group-by", "parent")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grouped" / "routing_agreement.png").read_bytes().startswith(PNG_SIGNATURE)
    result = run_tool(*files[:2], "--label", "a", "b", "--out", tmp_path / "overlay")
    assert result.returncode == 0, result.stderr
    assert run_tool(*files, "--label", "a", "--out", tmp_path / "x").returncode == 2


def test_group_statistics():
    from sapo_megatron.commands.plot import mean_std

    steps, means, stds = mean_std([([0, 1], [1.0, 2.0]), ([0, 1], [3.0, 4.0]), ([0], [5.0])])
    assert steps == [0, 1] and means == [3.0, 3.0]
    assert stds[1] == pytest.approx(1.0)  # population std over the seeds that have step 1


def test_bad_line_names_file_and_line(tmp_path):
    path = write_run(tmp_path / "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 6, "reward_mean": 0.\n')
    result = run_tool(path, "--out", tmp_path / "plots")
    assert result.returncode == 2
    assert f"{path}:7: not a JSON object" in result.stderr
