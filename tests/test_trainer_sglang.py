"""The trainer with the SGLang engine, against the schema-exact mock server, on 2 ranks.

Wiring under test: the model starts from an HF checkpoint (a tiny random Qwen3-MoE), one rank
per model-parallel group talks to the server and shares the results, R3 decodes the server's
routes (dense layer mapped out) and replays them, and after every step the live TP-sharded
weights are exported as HF safetensors and the server is told to load them and flush its cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist.ckpt_models import make_hf_model, read_safetensors_dir
from tests.launch import torchrun
from tests.sglang_mock import Behaviour, MockSGLang

CONFIG = """
run: {{output_dir: {out}, steps: 2, save_every: 2, tensorboard: false}}
model: {{preset: null, hf_dir: {hf}}}
parallel: {{tensor_model_parallel_size: 2}}
optim: {{lr: 1.0e-4}}
rollout:
  engine: sglang
  prompts_per_step: 4
  samples_per_prompt: 4
  max_new_tokens: 4
  sglang: {{urls: ["{url}"], retries: 1, backoff_s: 0.1, timeout_s: 60, weight_dir: {weights}}}
train: {{micro_batch_size: 4, updates_per_rollout: 2}}
routing: {{mode: R3}}
task: {{name: arithmetic}}
"""


@pytest.fixture
def mock():
    # The tiny HF model: 2 hidden layers, layer 0 dense, 4 experts, top-2; the arithmetic
    # task's 16-symbol alphabet fits in its 64-token vocabulary.
    server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16))
    yield server
    server.stop()


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_runs_r3_against_sglang_and_syncs_weights(mock, tmp_path):
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    out, weights = tmp_path / "run", tmp_path / "weights"
    config = tmp_path / "sglang.yaml"
    config.write_text(CONFIG.format(out=out, hf=hf, url=mock.url, weights=weights))
    torchrun("sapo_megatron.cli", "train", "--config", config, nproc=2, module=True)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(0.5 < r["routing/coverage"] < 1.0 for r in rows), "R3 replayed the server's routes"
    assert all(r["abort_frac"] == 0.0 for r in rows)
    # The gap R3 removes, from an extra forward pass with live routing (as with the embedded
    # engine; the rollout log-probs are the server's), and routing agreement without replay.
    for r in rows:
        assert math.isfinite(r["train_rollout_logprob_abs_diff_live"]) and "routing/live_agreement_mean" in r
        # The mock's routes are random: live routing gives other log-probs than the replay pass.
        assert r["train_rollout_logprob_abs_diff_live"] != r["train_rollout_logprob_abs_diff"]

    generates = [r for r in mock.requests if r["path"] == "/generate"]
    # One request per sample from the one rank of the TP group that talks to the server.
    assert len(generates) == 2 * 4 * 4
    assert all(r["body"]["return_routed_experts"] is True for r in generates)
    updates = [r for r in mock.requests if r["path"] == "/update_weights_from_disk"]
    # Version 0 (the starting weights) before the first rollout, then one per completed step.
    assert [Path(u["body"]["model_path"]).name for u in updates] == ["step_0", "step_1", "step_2"]
    assert [u["body"]["weight_version"] for u in updates] == ["0", "1", "2"]
    assert mock.served_versions == ["0"] * 16 + ["1"] * 16  # each step sampled from the weights it trains
    assert all(u["body"]["flush_cache"] is True for u in updates)  # SGLang flushes after loading
    # The exported HF checkpoint of the last step holds every tensor of the model.
    last = Path(updates[-1]["body"]["model_path"])
    exported = read_safetensors_dir(last)
    original = read_safetensors_dir(hf)
    assert set(exported) == set(original)
    assert json.loads((last / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    changed = [n for n in original if not (exported[n] == original[n]).all()]
    assert changed, "the servers were sent the initial weights, not the trained ones"


_calls = [0]


def _rank_dependent_reward(prompt_text, response_text, answer, meta) -> float:
    """DP rank 0's groups always differ in reward (kept by zero_variance), rank 1's never do."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        return 0.5
    _calls[0] += 1
    return float(_calls[0] % 2)


@pytest.mark.dist
@pytest.mark.slow
def test_dynamic_sampling_with_one_dp_rank_full_does_not_hang(mock, tmp_path):
    """Issue 19, finding 1: at DP=2 with dynamic sampling, the rank whose quota fills first used to
    skip ``engine.generate`` while the other generated another round; the SGLang replicas'
    world-wide stale-server re-sync then waited for it forever (a torchrun timeout here)."""
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    out, weights = tmp_path / "run", tmp_path / "weights"
    config = tmp_path / "sglang.yaml"
    text = CONFIG.format(out=out, hf=hf, url=mock.url, weights=weights)
    text = text.replace("parallel: {tensor_model_parallel_size: 2}", "parallel: {tensor_model_parallel_size: 1}")
    text = text.replace("task: {name: arithmetic}",
                        "task: {name: arithmetic, reward_fn: 'tests.test_trainer_sglang:_rank_dependent_reward'}")
    config.write_text(text)
    torchrun("sapo_megatron.cli", "train", "--config", config, "run.steps=1", "run.save_every=0",
             "rollout.dynamic_sampling.filter=zero_variance", "rollout.dynamic_sampling.max_rounds=3",
             nproc=2, module=True, timeout=300)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 filled its quota in round 0; rank 1 never could, so all 3 rounds ran and its 2 groups
    # were topped up with filtered ones; rank 0 called the engine with no prompts in rounds 1-2.
    assert row["rollout/sampling_rounds"] == 3.0 and row["rollout/topped_up_groups"] == 2.0
    generates = [r for r in mock.requests if r["path"] == "/generate"]
    assert len(generates) == (1 + 3) * 2 * 4, "rank 0: one round of 2 groups x 4; rank 1: three rounds"


def _prompts(config: Path, steps: int) -> list[list[tuple[int, ...]]]:
    """The token ids of each step's prompts, as every rank of the trainer draws them."""
    from sapo_megatron.config import load_config
    from sapo_megatron.tasks import PromptStream, build_task
    from sapo_megatron.trainer.loop import task_options

    cfg = load_config(config)
    stream = PromptStream(build_task(task_options(cfg.task)), seed=cfg.run.seed)
    return [[tuple(p.ids) for p in stream.next_batch(cfg.rollout.prompts_per_step)] for _ in range(steps)]


@pytest.mark.dist
@pytest.mark.slow
def test_r3_goes_on_when_a_rollout_is_fully_aborted(mock, tmp_path):
    """R3 at DP=2 with every sample aborted (a server down past the retry window): in step 0 on
    DP rank 0 only (it trains on nothing beside rank 1, with placeholder routes), in step 1 on
    both ranks (the step is skipped on every rank alike, with a warning and step_skipped). Used
    to raise "routing replay is on but the microbatch carries no routes" on rank 0."""
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    out, weights = tmp_path / "run", tmp_path / "weights"
    config = tmp_path / "sglang.yaml"
    text = CONFIG.format(out=out, hf=hf, url=mock.url, weights=weights)
    text = text.replace("parallel: {tensor_model_parallel_size: 2}", "parallel: {tensor_model_parallel_size: 1}")
    # Two-digit operands: prompts that do not repeat, so aborting by prompt picks a rank and a step.
    config.write_text(text.replace("task: {name: arithmetic}", "task: {name: arithmetic, options: {max_operand: 99}}"))
    step0, step1 = _prompts(config, 2)
    rank0, rank1 = set(step0[0::2]), set(step0[1::2])  # data-parallel rank d takes prompts d::dp
    assert not rank1 & (rank0 | set(step1)), "the arithmetic prompts repeat: pick another seed"
    mock.behaviour.abort_prompts = rank0 | set(step1)
    proc = torchrun("sapo_megatron.cli", "train", "--config", config, "run.save_every=0", nproc=2, module=True,
                    timeout=300)
    assert "step 1: every sample of the rollout was aborted" in proc.stdout + proc.stderr

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["abort_frac"] == 0.5 and rows[0]["step_skipped"] == 0.0 and math.isfinite(rows[0]["loss"])
    assert rows[1]["abort_frac"] == 1.0 and rows[1]["step_skipped"] == 1.0 and "loss" not in rows[1]
    updates = [r["body"]["weight_version"] for r in mock.requests if r["path"] == "/update_weights_from_disk"]
    assert updates == ["0", "1", "2"]  # the run went on: every step synced (the skipped one unchanged weights)
