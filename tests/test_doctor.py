"""``sapo-megatron doctor`` end to end against the schema-exact mock server (the real server:
tests/real_sglang/test_doctor_real.py), single process, under torchrun with TP=2 and EP=2 (DP=2),
and from our converted checkpoint.

The parallel and checkpoint runs measure the single-process run's recorded rollouts
(``--rollouts``), so all see the same tokens: the layouts may differ only by float32 reduction
order (TP's all-reduces, EP's other microbatches).
"""

from __future__ import annotations

import json

import pytest

from tests.dist.ckpt_models import make_hf_model
from tests.launch import clean_env, run, torchrun
from tests.sglang_mock import Behaviour, MockSGLang

CONFIG = """
task: {name: arithmetic}
rollout: {max_new_tokens: 6, prompts_per_step: 4, samples_per_prompt: 2}
train: {micro_batch_size: 8, updates_per_rollout: 1}
routing: {mode: R3}
"""


@pytest.fixture
def mock():
    # 2 layers, layer 0 dense, 4 experts top-2; the arithmetic task's 16 symbols fit the 64-token vocabulary.
    server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16))
    yield server
    server.stop()


def _doctor(*args, nproc: int = 1) -> dict:
    if nproc == 1:
        done = run(["python", "-m", "sapo_megatron.cli", "doctor", *args, "--json"], env=clean_env(), timeout=300)
    else:
        done = torchrun("sapo_megatron.cli", "doctor", *args, "--json", nproc=nproc, module=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.dist
@pytest.mark.slow
def test_doctor_against_the_mock_single_process_tp2_ep2_and_ckpt(mock, tmp_path):
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    one = _doctor("--config", config, "--url", mock.url, "--hf-dir", hf, "--out", tmp_path / "one")
    generates = [r for r in mock.requests if r["path"] == "/generate"]
    assert len(generates) == 8 and all(r["body"]["return_routed_experts"] for r in generates)
    assert not [r for r in mock.requests if "update_weights" in r["path"]], "the doctor never pushes weights"
    assert one["num_tokens"] > 0 and 0 <= one["routing_agreement_mean"] <= 1
    # The mock's routes are random: live routing disagrees with them, and replaying them changes the log-probs.
    assert one["token_differ_frac"] > 0 and one["replay"]["logprob_gap_mean"] != one["live"]["logprob_gap_mean"]
    assert one["verdict"] == "FAIL"  # the mock's log-probs are made up: the doctor must say so

    tp2 = _doctor("--config", config, "--rollouts", tmp_path / "one" / "rollouts.pt", "--hf-dir", hf,
                  "--out", tmp_path / "tp2", "parallel.tensor_model_parallel_size=2", nproc=2)
    assert tp2["num_tokens"] == one["num_tokens"]
    # float32 forward, TP=2 sums its row-parallel partials in another order: ~1e-6 per log-prob.
    for name in ("replay", "live"):
        for key in ("logprob_gap_mean", "logprob_gap_p50", "logprob_gap_p99", "logprob_gap_max"):
            assert tp2[name][key] == pytest.approx(one[name][key], abs=1e-4), (name, key)
    # Routes are argmax decisions: equal unless a router logit tie flips, which these random weights do not produce.
    assert tp2["routing_agreement_per_layer"] == one["routing_agreement_per_layer"]
    assert tp2["token_differ_frac"] == one["token_differ_frac"]

    # EP=2 on 2 ranks is DP=2: each rank measures half the samples; the per-token gaps are gathered
    # and the routing counts summed over DP. Other microbatches (4 per rank), so float noise only.
    ep2 = _doctor("--config", config, "--rollouts", tmp_path / "one" / "rollouts.pt", "--hf-dir", hf,
                  "--out", tmp_path / "ep2", "parallel.expert_model_parallel_size=2", "train.micro_batch_size=4",
                  nproc=2)
    assert ep2["num_tokens"] == one["num_tokens"]
    for name in ("replay", "live"):
        assert ep2[name]["logprob_gap_mean"] == pytest.approx(one[name]["logprob_gap_mean"], abs=1e-4)
    assert ep2["routing_agreement_per_layer"] == one["routing_agreement_per_layer"]
    assert ep2["token_differ_frac"] == one["token_differ_frac"]

    # --ckpt: our converted checkpoint of the same weights, same layout, same tokens: the same figures
    # exactly (the conversion copies the float32 tensors; the forward is deterministic on CPU).
    run(["python", "-m", "sapo_megatron.cli", "convert", "hf-to-mcore", "--hf-dir", hf, "--out", tmp_path / "ckpt"],
        env=clean_env(), timeout=300)
    ckpt = _doctor("--config", config, "--rollouts", tmp_path / "one" / "rollouts.pt", "--ckpt", tmp_path / "ckpt",
                   "--out", tmp_path / "ckpt_out")
    for name in ("replay", "live"):
        assert ckpt[name]["logprob_gap_mean"] == one[name]["logprob_gap_mean"]
    assert ckpt["routing_agreement_per_layer"] == one["routing_agreement_per_layer"]


def test_doctor_refuses_a_run_without_a_server_or_weights(tmp_path, capsys):
    from sapo_megatron.commands.doctor import main

    assert main(["--url", "http://127.0.0.1:1"], prog="doctor") == 2
    assert "--hf-dir DIR or --ckpt DIR" in capsys.readouterr().err
    assert main(["--hf-dir", str(tmp_path)], prog="doctor") == 2
    assert "give --url URL" in capsys.readouterr().err


def test_config_precedence_user_overrides_then_the_doctors_own_settings(tmp_path):
    """Defaults < --config < key=value < the doctor's settings; the headline mode is the user's."""
    from sapo_megatron.commands.doctor import build_parser, load_doctor_config

    config = tmp_path / "c.yaml"
    config.write_text("task: {name: arithmetic}\nrouting: {mode: none}\nrun: {steps: 50, resume: true}\n"
                      "train: {use_reference_model: true}\nrollout: {engine: sglang, sglang: {urls: ['http://a:1']}}\n")
    args = build_parser().parse_intermixed_args(
        ["--config", str(config), "--url", "http://b:2", "--num-prompts", "3", "--api-key-env", "MY_KEY",
         "--temperature", "0.7", "loss.tau_neg=2.0", "run.steps=9"])
    cfg, mode = load_doctor_config(args, tmp_path / "out")
    assert mode == "none" and cfg.routing.mode == "R3"  # routes are always asked; the run's mode names the headline
    assert cfg.loss.tau_neg == 2.0  # the user's override holds
    assert (cfg.run.steps, cfg.run.resume, cfg.train.use_reference_model) == (1, False, False)  # the doctor's
    assert cfg.rollout.sglang.urls == ["http://b:2"] and cfg.rollout.sglang.api_key_env == "MY_KEY"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.temperature, cfg.loss.temperature) == (3, 0.7, 0.7)
    assert cfg.run.output_dir == str(tmp_path / "out" / "run")
