"""``sapo-megatron doctor`` against the REAL SGLang server: its figures are the trainer's first step's.

The doctor samples from the server (bf16, as served) and measures under torchrun with the
training layout (TP=2, two gloo ranks); it records the rollouts it measured. The trainer then
runs ONE step of the same config (same layout, micro-batching, loss taus) on exactly those rollouts
(``rollout.engine=recorded``): a server's samples are not reproducible across calls (its CPU
batches form differently, and bf16 numerics with them), so sharing the tokens is the only way to
compare exactly. Both sides then compute the same forward on the same tokens in the same
microbatches; the figures may differ only by how they are summed:
- ``train_rollout_logprob_abs_diff`` (the R3 pass, a loss metric) is a float32 masked mean in the
  loss; the doctor's is a float64 mean of the same float32 values: relative 1e-5 covers float32
  accumulation over ~10^2-10^3 tokens.
- the live gap and the gate shares are float64 sums on both sides (trainer/mismatch.gap_counts vs
  doctor/report.gap_figures): 1e-9. Agreement and differ shares are counts: exact up to the one
  division (1e-12).
They are also the figures of tools/measure_mismatch.py (``trainer.mismatch.summarise`` of the
trainer's rows), which the doctor thereby reproduces on the same tokens.

Guards: the gap is not zero (a bf16 server against our fp32 forward), and the replay and live
passes are told apart by the comparison (each doctor figure is checked against the trainer
figure of ITS pass, and a wrong pairing is shown to differ wherever the passes differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sapo_megatron.trainer.mismatch import summarise
from tests.launch import clean_env, run, torchrun
from tests.real_sglang.conftest import API_KEY
from tests.real_sglang.harness import write_sum_prompts


def _config(tmp_path: Path, model: Path) -> Path:
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "steps": 1, "save_every": 0, "tensorboard": False, "seed": 3},
        "model": {"preset": None, "hf_dir": str(model)},
        "parallel": {"tensor_model_parallel_size": 2},
        "optim": {"lr": 1.0e-6},
        # 4 x 4 samples in ONE microbatch: the loss metric's mean is then over the same tokens as ours.
        "rollout": {"engine": "sglang", "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 24,
                    "temperature": 1.0, "sglang": {"api_key_env": "SAPO_TEST_SGLANG_KEY", "timeout_s": 120}},
        "train": {"micro_batch_size": 16, "updates_per_rollout": 1},
        "routing": {"mode": "R3"},
        "task": {"name": "math", "path": str(write_sum_prompts(tmp_path / "prompts.jsonl")), "format": "gsm8k",
                 "options": {"tokenizer": str(model), "verifier": "regex"}},
    }
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_doctor_figures_are_the_trainers_first_step(servers, tiny_model, tmp_path):
    server = servers.keyed("a")
    config, out = _config(tmp_path, tiny_model), tmp_path / "doctor"
    env = clean_env(SAPO_TEST_SGLANG_KEY=API_KEY)
    done = torchrun("sapo_megatron.cli", "doctor", "--config", config, "--url", server.url, "--out", out, "--json",
                    nproc=2, module=True, env=env, timeout=420)
    report = json.loads(done.stdout.strip().splitlines()[-1])  # --json: one object, printed by rank 0
    assert report == json.loads((out / "doctor.json").read_text())
    for key in ("routing_agreement_mean", "token_differ_frac", "logprob_gap_mean", "logprob_gap_p99",
                "gate_low_frac", "num_tokens"):
        assert key in report, key

    torchrun("sapo_megatron.cli", "train", "--config", config, "rollout.engine=recorded",
             f"rollout.recorded_path={out / 'rollouts.pt'}", nproc=2, module=True, env=env, timeout=420)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    step = rows[0]
    # The same tokens: every response token of the step (none aborted) is one the doctor measured.
    assert step["abort_frac"] == 0.0
    assert report["num_tokens"] == round(step["response_len_mean"] * 16)

    replay, live = report["replay"], report["live"]
    assert abs(replay["logprob_gap_mean"] - step["train_rollout_logprob_abs_diff"]) <= 1e-5 * replay["logprob_gap_mean"]
    assert abs(live["logprob_gap_mean"] - step["train_rollout_logprob_abs_diff_live"]) <= 1e-9
    assert abs(replay["gate_low_frac"] - step["train_rollout_gate_low_frac"]) <= 1e-9
    assert abs(live["gate_low_frac"] - step["train_rollout_gate_low_frac_live"]) <= 1e-9
    assert abs(report["routing_agreement_mean"] - step["routing/live_agreement_mean"]) <= 1e-12
    assert abs(report["token_differ_frac"] - step["routing/live_token_differ_frac"]) <= 1e-12
    for m, value in enumerate(report["routing_agreement_per_layer"]):
        assert abs(value - step[f"routing/live_agreement_moe{m}"]) <= 1e-12

    # tools/measure_mismatch.py's figures of that step are the doctor's.
    figures = summarise(rows)
    assert abs(figures["logprob_abs_diff_live"] - live["logprob_gap_mean"]) <= 1e-9
    assert abs(figures["routing_agreement_live"] - report["routing_agreement_mean"]) <= 1e-12

    # Guards: a real gap (bf16 server vs our fp32 forward), and the passes told apart where they differ.
    assert replay["logprob_gap_mean"] > 1e-6 and live["logprob_gap_mean"] > 1e-6
    if report["token_differ_frac"] > 0:
        assert abs(live["logprob_gap_mean"] - step["train_rollout_logprob_abs_diff"]) > 1e-9

    # The plot command draws the doctor's position buckets.
    drawn = run(["python", "-m", "sapo_megatron.cli", "plot", out / "doctor_positions.jsonl", "--out", tmp_path / "plots"],
                env=env, timeout=120)
    assert "doctor_gap_by_position.png" in drawn.stdout
