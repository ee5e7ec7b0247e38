"""Bounded staleness on the embedded engine: a lagged policy copy, staleness metrics, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sapo_megatron.rollout.engine_copy import EngineCopy
from tests.launch import torchrun

ROOT = Path(__file__).resolve().parents[1]


def _set(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_lagged_weights_sample_k_versions_ago():
    live, copy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    _set(live, 0.0)
    lagged = EngineCopy([copy], [live], lag=2)
    seen = []
    for version in range(1, 6):
        _set(live, float(version))  # the trainer's weights after `version` RL steps
        lagged.update_weights([live], version)
        seen.append((lagged.version, float(copy.weight.detach()[0, 0])))
    # The copy holds version max(0, v - 2) and exactly those weights; the live model is untouched.
    assert seen == [(0, 0.0), (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert float(live.weight.detach()[0, 0]) == 5.0
    assert sorted(lagged.snapshots) == [3, 4, 5]  # only what a later sync can still need
    # Round trip through a checkpoint's extra state.
    other = EngineCopy([torch.nn.Linear(2, 2)], [live], lag=2)
    other.load_state_dict(lagged.state_dict())
    assert other.version == 3 and float(other.chunks[0].weight[0, 0]) == 3.0
    with pytest.raises(ValueError, match="rollout.max_staleness=2"):
        EngineCopy([torch.nn.Linear(2, 2)], [live], lag=1).load_state_dict(lagged.state_dict())


def test_engine_begin_snapshots_the_weights_the_rl_loop_starts_from():
    """A copy built at start-up, then a cold start changes the trainer's weights: begin(version 0)
    must make the copy sample from the cold-started weights, not the initial ones."""
    from sapo_megatron.rollout.embedded import EmbeddedEngine

    live, copy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    _set(live, 0.0)
    engine = EmbeddedEngine([live], num_experts=None, copy=EngineCopy([copy], [live], lag=4, dtype="bf16"))
    _set(live, 0.5)  # the cold start's updates
    assert float(copy.weight[0, 0]) == 0.0  # guard: the copy still holds the initial weights
    engine.begin([live], 0)
    assert engine.copy.version == 0 and float(copy.weight[0, 0]) == 0.5 and copy.weight.dtype == torch.bfloat16
    _set(live, 1.0)
    engine.update_weights([live], 1)  # lag 4: still version 0, i.e. the cold-started weights
    assert engine.copy.version == 0 and float(copy.weight[0, 0]) == 0.5


def test_lag_zero_follows_the_trainer():
    live, copy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    lagged = EngineCopy([copy], [live], lag=0)
    _set(live, 7.0)
    lagged.update_weights([live], 1)
    assert lagged.version == 1 and float(copy.weight[0, 0]) == 7.0


def test_bf16_copy_holds_rounded_weights_and_keeps_fp32_snapshots():
    live, copy = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    with torch.no_grad():
        live.weight.copy_(torch.tensor([[1.0 + 2**-10, 0.1, -3.3], [7e-3, 1.0, 2.0], [0.3, 0.2, 0.1]]))
    eng = EngineCopy([copy], [live], lag=1, dtype="bf16")
    assert copy.weight.dtype == torch.bfloat16
    # Exactly the round-to-nearest bf16 of the trainer's fp32 weights (1 + 2**-10 is below bf16's
    # 2**-7 step at 1.0, so it rounds to 1.0: the cast is not vacuous).
    assert torch.equal(copy.weight, live.weight.detach().to(torch.bfloat16))
    assert float(copy.weight[0, 0]) == 1.0 and float(live.weight[0, 0]) != 1.0
    assert eng.snapshots[0][0]["weight"].dtype == torch.float32  # no compounded roundings
    # The copy computes in bf16 (activations too) and differs from the fp32 trainer.
    x = torch.randn(4, 3)
    out = copy(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert not torch.equal(out.float(), live(x).detach())
    state = eng.state_dict()
    assert state["dtype"] == "bf16"
    with pytest.raises(ValueError, match="rollout.embedded.dtype"):
        EngineCopy([torch.nn.Linear(3, 3)], [live], dtype="fp8")


def test_needs_engine_copy():
    from sapo_megatron.rollout.engine_copy import needs_engine_copy

    assert not needs_engine_copy(0, "fp32", 0.0)
    assert needs_engine_copy(1, "fp32", 0.0) and needs_engine_copy(0, "bf16", 0.0) and needs_engine_copy(0, "fp32", 0.1)


SMALL = ["run.save_every=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "run.tensorboard=false",
         "run.progress=false", "train.micro_batch_size=4", "rollout.max_staleness=2", "loss.tis_cap=2.0"]


def _train(out: Path, *overrides: str) -> list[dict]:
    torchrun("sapo_megatron.cli", "train", "--config", ROOT / "tests" / "configs" / "tiny_rl.yaml", f"run.output_dir={out}",
             *SMALL, *overrides, nproc=2, module=True, timeout=900)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
@pytest.mark.slow
def test_async_resume_continues_exactly(tmp_path):
    full = _train(tmp_path / "full", "run.steps=4")
    # Staleness grows to the bound and stays there; nothing is older than k, nothing dropped.
    assert [r["async/staleness_max"] for r in full] == [0.0, 1.0, 2.0, 2.0]
    assert all(r["async/dropped_frac"] == 0.0 for r in full)
    # Log-prob semantics: the engine's log-probs are the behaviour policy's (the lagged copy), the
    # trainer's old log-probs the proximal policy's. At staleness 0 both are the same weights (the
    # gap is float noise from other batch shapes, ~1e-6); at staleness 2 they differ by far more.
    gap = [r["train_rollout_logprob_abs_diff"] for r in full]
    assert gap[0] < 1e-4 and min(gap[2:]) > 100 * max(gap[0], 1e-7), gap
    # The decoupled correction sees it: TIS weights pi_prox / pi_behav are 1 at staleness 0; later
    # they spread (their mean stays near 1, an importance weight's expectation, but moves).
    dev = [abs(r["tis_weight_mean"] - 1.0) for r in full]
    assert dev[0] < 1e-4 and max(dev[2:]) > 10 * max(dev[0], 1e-6), dev
    _train(tmp_path / "part", "run.steps=2")
    resumed = _train(tmp_path / "part", "run.steps=4")  # resumes from step 2's checkpoint
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # metrics.jsonl appends
    for key in ("loss", "reward_mean", "grad_norm", "loss_first_update", "async/staleness_mean"):
        assert [r[key] for r in resumed[2:]] == [r[key] for r in full[2:]], key
    # Not vacuous: the steps after the resume trained on something. (Without the snapshots in the
    # checkpoint, step 2's sync would need version 1, which a fresh engine does not hold.)
    assert any(r["grad_norm"] > 0 for r in full[2:])


@pytest.mark.dist
@pytest.mark.slow
def test_sglang_background_rollout_is_one_version_stale(tmp_path):
    """max_staleness=1 with the SGLang engine: the next batch is generated during the step."""
    from tests.dist.ckpt_models import make_hf_model
    from tests.sglang_mock import Behaviour, MockSGLang

    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16,
                                  delay_per_token_s=0.05))
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"""
run: {{output_dir: {tmp_path / 'run'}, steps: 3, save_every: 0, tensorboard: false, progress: false}}
model: {{preset: null, hf_dir: {hf}}}
parallel: {{tensor_model_parallel_size: 2}}
rollout:
  engine: sglang
  prompts_per_step: 4
  samples_per_prompt: 4
  max_new_tokens: 4
  max_staleness: 1
  sglang: {{urls: ["{server.url}"], retries: 1, backoff_s: 0.1, timeout_s: 60, weight_dir: {tmp_path / 'w'}}}
train: {{micro_batch_size: 4, updates_per_rollout: 2}}
routing: {{mode: R3}}
""")
        torchrun("sapo_megatron.cli", "train", "--config", config, nproc=2, module=True, timeout=600)
        paths = server.paths()
    finally:
        server.stop()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Step 0 is generated with version 0 before training; later batches one version behind.
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["async/dropped_frac"] == 0.0 for r in rows)
    assert all(0.0 <= r["async/overlap_frac"] <= 1.0 and r["async/wait_rollout_s"] >= 0 for r in rows)
    # Three batches of 16 requests (the last step prefetches nothing); weight loads: version 0
    # before the first rollout, then one per completed step.
    assert paths.count("/generate") == 3 * 16
    assert paths.count("/update_weights_from_disk") == 1 + 3


MISMATCH = ["run.save_every=2", "run.progress=false", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
            "train.micro_batch_size=2", "rollout.max_staleness=2", "rollout.embedded.dtype=bf16",
            "rollout.embedded.router_noise_std=0.03", "routing.mode=R3",
            # The grid's cold start, shortened: the copy must start RL from the cold-started weights.
            "train.cold_start_steps=2",
            # 16 samples of a barely trained policy: the format credit gives the groups reward
            # variance, so the resumed steps have gradients to get wrong (checked below).
            "task.options.format_credit=0.1"]


def _train_mismatch(out: Path, *overrides: str) -> list[dict]:
    # The grid's own config (bf16 + router noise engine, 8 updates per rollout), shrunk.
    torchrun("sapo_megatron.cli", "train", "--config", ROOT / "configs" / "ablation_cpu.yaml", f"run.output_dir={out}",
             *MISMATCH, *overrides, nproc=2, module=True, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows[:2]] == ["cold_start", "cold_start"]
    return [r for r in rows if r["phase"] == "rl"]


@pytest.mark.dist
@pytest.mark.slow
def test_mismatch_engine_resume_continues_exactly(tmp_path):
    """bf16 copy + router noise + lag 2: the copy's snapshots and the (seed, step) noise make a
    resumed run identical to the uninterrupted one."""
    full = _train_mismatch(tmp_path / "full", "run.steps=4")
    # The mismatch is real from step 0 (same weights, other numerics): a log-prob gap far above
    # fp32 noise (~1e-6, test_async_resume_continues_exactly) and router decisions that differ.
    assert full[0]["train_rollout_logprob_abs_diff"] > 1e-4
    assert full[0]["routing/live_agreement_mean"] < 1.0
    assert all("routing/live_agreement_moe1" in r and "train_rollout_logprob_abs_diff_live" in r for r in full)
    _train_mismatch(tmp_path / "part", "run.steps=2")
    resumed = _train_mismatch(tmp_path / "part", "run.steps=4")
    assert [r["rl_step"] for r in resumed] == [0, 1, 2, 3]
    for key in ("loss", "reward_mean", "grad_norm", "routing/live_agreement_mean", "routing/agreement_mean",
                "train_rollout_logprob_abs_diff", "train_rollout_logprob_abs_diff_live"):
        assert [r[key] for r in resumed[2:]] == [r[key] for r in full[2:]], key
    assert any(r["grad_norm"] > 0 for r in full[2:])
