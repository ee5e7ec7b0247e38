"""The supervised cold start and the exact-answer metric, piece by piece (no torchrun).

- ``Task.score``: exactness of the arithmetic task (the text, not the shaped reward), of the math
  task (its binary reward) and through a user reward function (the wrapped task's);
- the reference responses a cold start trains on, and the samples built from them;
- the ``nll`` loss against its formula, -A log p, gradient -A per token;
- the ``train.cold_start_*`` keys' checks and the cold start's checkpoint state.

The cold start through the trainer on 2 ranks (metrics, checkpoints, exact resume) is in
``tests/test_cold_start_dist.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.losses import compute_policy_loss
from sapo_megatron.tasks import Prompt, Score, build_task, reference_response_ids, score_response
from sapo_megatron.trainer.cold_start import ColdStart, reference_samples


def _prompt(task, text="3+4=", answer="7"):
    return Prompt(uid="u", text=text, ids=task.tokenizer.encode(text), answer=answer, meta={})


@pytest.mark.parametrize("response, reward, exact", [
    ("7", 1.0, True), ("7+", 0.5, False), ("07", 0.5, False), ("8", 0.0, False), ("", 0.0, False),
])
def test_arithmetic_score_is_the_reward_and_the_exact_text(response, reward, exact):
    task = build_task({"name": "arithmetic", "format_credit": 0.0})
    tok = task.tokenizer
    ids = tok.encode(response) + [tok.eos_id, *tok.encode("12")]  # after EOS: ignored
    assert task.score(_prompt(task), ids, tok.decode(ids)) == Score(reward, exact)


def test_arithmetic_exactness_does_not_follow_a_full_partial_credit():
    # With partial_credit 1.0 a stray character scores like the answer, but is not exact.
    task = build_task({"name": "arithmetic", "partial_credit": 1.0})
    tok = task.tokenizer
    assert task.score(_prompt(task), tok.encode("7+"), "7+") == Score(1.0, False)
    assert task.score(_prompt(task), tok.encode("7") + [tok.pad_id], "7") == Score(1.0, False)  # PAD is a character
    assert task.score(_prompt(task), tok.encode("7"), "7") == Score(1.0, True)


def test_score_response_falls_back_to_the_reward_with_exactness_unknown():
    class RewardOnly:
        name = "plain"
        tokenizer = None

        def reward(self, prompt, response_ids, response_text):
            return 0.25

    assert score_response(RewardOnly(), None, [], "") == Score(0.25, None)


def test_user_reward_keeps_the_wrapped_tasks_exactness():
    task = build_task({"name": "arithmetic", "reward_fn": "tests.test_cold_start:_always_half"})
    tok = task.tokenizer
    assert task.score(_prompt(task), tok.encode("7"), "7") == Score(0.5, True)
    assert task.score(_prompt(task), tok.encode("6"), "6") == Score(0.5, False)


def _always_half(prompt_text, response_text, answer, meta):
    return 0.5


def test_math_score_reports_its_binary_reward_as_exactness(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n')
    task = build_task({"name": "math", "path": str(path), "tokenizer": "byte", "verifier": "regex"})
    prompt = next(task.prompts(seed=0))
    assert task.score(prompt, [], "so \\boxed{2}") == Score(1.0, True)
    assert task.score(prompt, [], "so \\boxed{3}") == Score(0.0, False)


def test_reference_responses():
    task = build_task({"name": "arithmetic", "max_operand": 9})
    tok = task.tokenizer
    assert reference_response_ids(task, _prompt(task, "9+8=", "17")) == tok.encode("17") + [tok.eos_id]

    class NoCustom:  # the default: the answer encoded, then EOS
        name = "plain"
        tokenizer = tok

    assert reference_response_ids(NoCustom(), _prompt(task, "1+1=", "2")) == tok.encode("2") + [tok.eos_id]
    with pytest.raises(ValueError, match="prompt 'u' has no answer .* train.cold_start_steps=0"):
        reference_response_ids(NoCustom(), _prompt(task, "1+1=", None))


def test_reference_samples_put_the_loss_on_the_response_only():
    task = build_task({"name": "arithmetic", "max_operand": 9})
    (sample,) = reference_samples(task, [_prompt(task, "9+8=", "17")])
    tok = task.tokenizer
    assert sample.tokens.tolist() == tok.encode("9+8=17") + [tok.eos_id]
    # Targets are tokens 1..6; the response "1", "7", EOS are targets 3, 4, 5 (tokens 4, 5, 6).
    assert sample.loss_mask.tolist() == [False, False, False, True, True, True]
    assert sample.advantages.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert sample.routes is None and sample.old_log_probs.abs().sum() == 0


def test_nll_loss_is_minus_advantage_times_log_prob():
    log_probs = torch.tensor([[-0.5, -2.0, -0.1], [-1.0, -3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # old log-probs far away: the nll loss has no ratio, so they must not matter.
    loss, metrics = compute_policy_loss("nll", log_probs, log_probs.detach() - 5.0, adv, mask, reduction="token_mean")
    loss.backward()
    expected = (0.5 + 2.0 + 0.1 + 2 * 1.0 + 2 * 3.0) / 5  # -A log p, mean over the 5 valid tokens
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)  # float64 throughout: exact to round-off
    assert torch.equal(log_probs.grad, torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]], dtype=torch.float64) / 5)
    assert metrics["low_weight_frac"] == 0.0


@pytest.mark.parametrize("override, message", [
    ("train.cold_start_steps=-1", "train.cold_start_steps must be >= 0"),
    ("train.cold_start_lr=0", "train.cold_start_lr must be > 0 or null"),
])
def test_cold_start_keys_are_checked(override, message):
    from sapo_megatron.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(None, [override])


def test_cold_start_with_a_reference_model_is_refused():
    from sapo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.cold_start_steps=5 with train.use_reference_model=true"):
        load_config(None, ["train.cold_start_steps=5", "train.use_reference_model=true"])
    assert load_config(None, ["train.cold_start_steps=5", "train.cold_start_lr=3e-4"]).train.cold_start_lr == 3e-4


def test_cold_start_state_round_trip_and_rl_closes_it():
    from sapo_megatron.config import load_config

    cfg = load_config(None, ["train.cold_start_steps=6", "rollout.prompts_per_step=4"])
    task = build_task({"name": "arithmetic"})
    cold = ColdStart(cfg, task)
    assert (cold.lr, cold.spec.type, cold.finished) == (cfg.optim.lr, "nll", False)
    first = [p.uid for p in cold.stream.next_batch(4)]
    cold.done = 1
    state = cold.state_dict()
    again = ColdStart(cfg, task)
    again.load_state_dict(state, rl_step=0)  # mid cold start: continue where it stopped
    assert again.done == 1 and not again.finished and again.stream.position == 4
    assert [p.uid for p in again.stream.next_batch(4)] != first  # the next prompts, not the first again
    closed = ColdStart(cfg, task)
    closed.load_state_dict(state, rl_step=3)  # RL had started: never back to the cold start
    assert closed.done == 1 and closed.finished
    legacy = ColdStart(cfg, task)
    legacy.load_state_dict(None, rl_step=2)  # a checkpoint from before cold starts existed
    assert legacy.done == 0 and legacy.finished
