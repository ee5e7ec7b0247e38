"""The supervised cold start through the trainer on 2 gloo ranks (TP=2 + SP, R3 for the RL steps).

One run of 4 cold-start steps then 2 RL steps, checkpoints every 2 steps of each phase; then the
same run resumed from its checkpoint in the middle of the cold start (iteration 2) and from the
one at its end (iteration 4), as a run killed right after those saves would be: both must
reproduce the uninterrupted run's later rows exactly (cold-start NLL, RL loss, reward,
exact_frac, gradient norms), because model, optimizer, RNG, both prompt streams and the
cold-start position are restored.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.launch import ROOT, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CONFIG = ROOT / "tests" / "configs" / "tiny_rl.yaml"
SMALL = ["run.steps=2", "run.save_every=2", "run.keep_last=3", "train.cold_start_steps=4",
         "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "train.micro_batch_size=4",
         "run.tensorboard=false", "run.progress=false"]
TRACKER = "latest_checkpointed_iteration.txt"


def _train(out: Path) -> list[dict]:
    torchrun("sapo_megatron.cli", "train", "--config", CONFIG, f"run.output_dir={out}", *SMALL,
             nproc=2, module=True, timeout=900)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold_start") / "full"
    return out, _train(out)


def test_rows_phases_and_checkpoints(full_run):
    out, rows = full_run
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]  # one counter over both phases
    assert [r["phase"] for r in rows] == ["cold_start"] * 4 + ["rl"] * 2
    cold, rl = rows[:4], rows[4:]
    assert [r["cold_start_step"] for r in cold] == [0, 1, 2, 3]
    assert [r["rl_step"] for r in rl] == [0, 1]
    # A fresh tiny model is close to uniform over its 16 tokens: the first NLL is near ln 16
    # (2.77; its logits are small but not zero, measured 2.76); 0.15 is far below what a
    # broken mask (prompt tokens too) or target shift would give on the first step.
    assert abs(cold[0]["sft_loss"] - math.log(16)) < 0.15, cold[0]
    assert cold[-1]["sft_loss"] < cold[0]["sft_loss"] - 0.05, [r["sft_loss"] for r in cold]  # it trains
    assert all(r["lr"] == 1e-3 and r["grad_norm"] > 0 for r in cold)
    for r in rl:
        assert 0.0 <= r["exact_frac"] <= 1.0 and 0.0 <= r["reward_mean"] <= 1.0
        assert "sft_loss" not in r and r["routing/coverage"] > 0.5  # R3 replays in the RL steps
    ckpts = out / "checkpoints"
    assert (ckpts / TRACKER).read_text() == "6"
    metas = {p.name: json.loads((p / "meta.json").read_text()) for p in sorted(ckpts.glob("iter_*"))}
    assert sorted(metas) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert [(m["rl_step"], m["cold_start"]["steps_done"]) for m in metas.values()] == [(0, 2), (0, 4), (2, 4)]


def _rewind(full: Path, out: Path, iteration: int) -> None:
    """``out``: ``full`` as a run killed just after its checkpoint ``iteration`` was published."""
    shutil.copytree(full, out)
    ckpts = out / "checkpoints"
    for later in ckpts.glob("iter_*"):
        if int(later.name.split("_")[1]) > iteration:
            shutil.rmtree(later)
    (ckpts / TRACKER).write_text(str(iteration))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:iteration]))


COMPARED = {"cold_start": ("sft_loss", "grad_norm", "entropy"),
            "rl": ("loss", "loss_first_update", "reward_mean", "exact_frac", "grad_norm", "ratio_max", "entropy")}


@pytest.mark.parametrize("iteration", [2, 4], ids=["mid_cold_start", "after_cold_start"])
def test_resume_reproduces_the_later_steps_exactly(full_run, tmp_path, iteration):
    full, rows = full_run
    out = tmp_path / "resumed"
    _rewind(full, out, iteration)
    resumed = _train(out)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    for a, b in zip(rows[iteration:], resumed[iteration:]):
        assert a["phase"] == b["phase"]
        for key in COMPARED[a["phase"]]:
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]} != {b[key]} after resuming at {iteration}"
    # Not vacuous: the steps compared differ from one another (the run moved between them).
    assert len({r["sft_loss"] for r in rows[:4]}) == 4 and rows[4]["loss"] != rows[5]["loss"]
