"""The RL loop end to end on 2 gloo ranks (TP=2 + SP, R3 with the embedded engine).

One run of 4 steps with checkpoints every 2; a second run stopped after 2 steps and resumed
to 4 must reproduce the uninterrupted run's steps 3 and 4 exactly (same loss, reward and
gradient norm), because model, optimizer, RNG, data position and the sampling seed are all
restored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, clean_env, run

# The RL loop as the demo ran it before its cold start; the demo's own config is free to change.
CONFIG = "tests/configs/tiny_rl.yaml"
SMALL = ["run.steps=4", "run.save_every=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "train.micro_batch_size=4", "run.tensorboard=false"]


def _train(out: Path, *overrides: str) -> None:
    # Through the shipped launcher (torchrun, 2 ranks), as a user starts the demo.
    run(["bash", ROOT / "examples" / "run_tiny_cpu.sh", f"output_dir={out}", *SMALL, *overrides], timeout=900,
        env=clean_env(CONFIG=CONFIG))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "full"
    _train(out)
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_metrics_checkpoints_and_config(full_run):
    rows = _metrics(full_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert 0.0 <= r["reward_mean"] <= 1.0
        for key in ("loss", "grad_norm", "gate_mean_pos", "low_weight_frac", "ratio_max",
                    "train_rollout_logprob_abs_diff", "routing/agreement_mean", "routing/coverage"):
            assert key in r, f"metrics.jsonl lacks {key}"
        # R3: every token but each sample's last replays the engine's routes.
        assert 0.5 < r["routing/coverage"] < 1.0
    ckpts = full_run / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["iter_0000002", "iter_0000004"]
    assert {"meta.json", ".metadata", "metadata.json"} <= {p.name for p in (ckpts / "iter_0000004").iterdir()}
    resolved = (full_run / "config.yaml").read_text()
    assert "tau_neg: 1.05" in resolved and "mode: R3" in resolved


@pytest.mark.dist
@pytest.mark.slow
def test_resume_reproduces_the_next_steps_exactly(full_run, tmp_path):
    out = tmp_path / "resumed"
    _train(out, "run.steps=2")
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2"
    _train(out)  # resumes from step 2 and runs steps 3 and 4
    full, resumed = _metrics(full_run), _metrics(out)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(full[2:], resumed[2:]):
        for key in ("loss", "loss_first_update", "reward_mean", "grad_norm", "ratio_max", "entropy"):
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]} != {b[key]} after resume"


def test_checkpoint_survives_a_crash_mid_save(single_rank_parallel, tmp_path, monkeypatch):
    """A save killed half-way leaves ``latest`` on the previous, loadable checkpoint."""
    from sapo_megatron.step import build_model_chunks, build_optimizer
    from sapo_megatron.models import ModelConfig, ParallelConfig
    from sapo_megatron.trainer import checkpoint as ckpt

    chunks = build_model_chunks(ModelConfig(), ParallelConfig())
    optimizer = build_optimizer(chunks)
    ckpt.save_checkpoint(tmp_path, 1, chunks, optimizer, meta={"data": {"position": 7}})
    saved = {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed during save")

    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    monkeypatch.setattr("megatron.core.dist_checkpointing.save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, chunks, optimizer, meta={"data": {"position": 9}})
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "iter_0000001"
    meta = ckpt.load_checkpoint(latest, chunks, optimizer)
    assert meta["data"] == {"position": 7}
    for k, v in chunks[0].state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k
    # The next save cleans the half-written directory and publishes normally.
    ckpt.save_checkpoint(tmp_path, 2, chunks, optimizer, meta={"data": {"position": 9}})
    assert ckpt.latest_checkpoint(tmp_path).name == "iter_0000002"
    assert not (tmp_path / "checkpoints" / "tmp_iter_0000002").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_r2_with_reference_model_and_kl(tmp_path):
    """R2 (routes recorded in the old-log-prob pass, replayed in the updates) plus a reference
    model (live routing) for the KL penalty, on packed microbatches."""
    out = tmp_path / "r2"
    _train(out, "run.steps=2", "routing.mode=R2", "train.use_reference_model=true", "loss.kl_coef=0.01",
           "train.layout=packed")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert math.isfinite(r["kl"]) and r["kl"] >= 0.0
        assert 0.5 < r["routing/coverage"] < 1.0
    # The reference is the initial policy; the policy moves away from it with every update.
    assert rows[1]["kl"] > 0.0, "after two updates the policy has moved away from the reference"


def test_aborted_requests_neither_train_nor_move_their_group():
    from sapo_megatron.losses import grpo_advantages
    from sapo_megatron.rollout.base import RolloutResult
    from sapo_megatron.trainer.loop import _build_samples, group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9], dtype=torch.float64)
    aborted = torch.tensor([False, False, True, False, False, False])
    adv = group_advantages("grpo", rewards, 3, aborted)
    assert adv[2] == 0.0
    # The completed samples of group 0 get the advantages of a group of two.
    two = grpo_advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), 3)
    assert adv[0] == pytest.approx(float(two[0])) and adv[1] == pytest.approx(float(two[1]))
    assert torch.equal(adv[3:], grpo_advantages(rewards[3:], 3))

    routes = torch.zeros(4, 2, 2, dtype=torch.uint8)
    results = [
        RolloutResult([3, 4, 5], [6, 1], [-0.5, -0.1], "stop", routes=routes),
        RolloutResult([3, 4, 5], [], [], "abort"),
    ]
    ok, bad = _build_samples(results, [1.0, 0.0], use_routes=True, route_layout=(2, 2, torch.uint8))
    assert ok.loss_mask.tolist() == [False, False, True, True]  # targets of tokens 6 and 1
    assert not bad.loss_mask.any() and bad.routes.shape == (2, 2, 2) and bad.routes.dtype == torch.uint8
    assert bad.routes[0, 0].tolist() == [0, 1], "placeholder routes name distinct experts"
    # A rollout with every sample aborted (a server down past the retry window) has no routes
    # to copy a shape from: the placeholders come from the model's layout.
    (alone,) = _build_samples(results[1:], [0.0], use_routes=True, route_layout=(3, 2, torch.int16))
    assert alone.routes.shape == (2, 3, 2) and alone.routes.dtype == torch.int16 and not alone.loss_mask.any()
