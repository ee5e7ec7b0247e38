"""Multi-turn episodes (rollout/episodes.py): stitching turns into one sample, pure, one process.

A scripted engine answers each turn and routes every token by a fixed function of its position
and token id, returning only the rows from ``routes_start`` on, as SGLang does with
``routed_experts_start_len``. The stitched routes must then equal that function over the whole
episode (what a single-pass prefill of the episode would route), the loss mask must cover
exactly the model's tokens and the log-probs sit on those tokens.
"""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.rollout.base import RolloutResult, SamplingParams
from sapo_megatron.rollout.episodes import (
    EnvStep,
    EpisodeRunner,
    episode_metrics,
    reduce_episode_metrics,
    wrap_episodes,
)
from sapo_megatron.tasks import Prompt, build_task
from sapo_megatron.trainer.loop import _build_samples

LAYERS, TOPK, EXPERTS = 2, 2, 8


def routes_of(tokens: list[int]) -> torch.Tensor:
    """The 'true' routing of a whole sequence: rows for every token but the last."""
    rows = [[[(3 * j + t + m) % EXPERTS, (3 * j + t + m + 1) % EXPERTS] for m in range(LAYERS)]
            for j, t in enumerate(tokens[:-1])]
    return torch.tensor(rows, dtype=torch.uint8).reshape(-1, LAYERS, TOPK)


class ScriptedEngine:
    """Answers turn k of every episode with ``script[k]``; log-prob of token t is -t/100."""

    def __init__(self, script: list[list[int]], abort_turn: int | None = None):
        self.script, self.abort_turn, self.calls = script, abort_turn, []

    def generate(self, prompts, params, *, return_routes, routes_start=None):
        turn = len(self.calls)
        self.calls.append((list(map(list, prompts)), list(routes_start)))
        out = []
        for prompt, start in zip(prompts, routes_start):
            if turn == self.abort_turn:
                out.append(RolloutResult(list(prompt), [], [], "abort"))
                continue
            resp = self.script[turn]
            routes = routes_of(list(prompt) + resp)[start:] if return_routes else None
            out.append(RolloutResult(list(prompt), resp, [-t / 100 for t in resp], "stop", routes,
                                     {"weight_version": str(turn)}))
        return out


class EchoTask:
    """Observation [50, 51] after every turn until the 3rd, whose reward is 0.75."""

    name = "echo"

    class tokenizer:
        eos_id, pad_id, vocab_size = 1, 0, 64

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    def start_episode(self, prompt):
        task = self

        class Env:
            seen = []

            def step(self, conversation, turn, text, *, final):
                self.seen.append(list(conversation))
                task.last_env = self
                if final:
                    return EnvStep(done=True, reward=0.75, exact=False)
                return EnvStep(observation=[50, 51], tool_call=True)

        return Env()


PARAMS = SamplingParams(max_new_tokens=4)


def _prompt(ids):
    return Prompt(uid="p", text="", ids=ids, answer=None)


def test_stitched_routes_mask_and_log_probs_match_the_whole_episode():
    script = [[10, 11, 1], [20, 1], [30, 31, 32, 1]]
    engine = ScriptedEngine(script)
    runner = EpisodeRunner(engine, EchoTask(), max_turns=3)
    prompt = [5, 6, 7]
    [res] = runner.generate([prompt], PARAMS, return_routes=True, episodes_of=[_prompt(prompt)])
    episode = prompt + [10, 11, 1, 50, 51, 20, 1, 50, 51, 30, 31, 32, 1]
    assert res.prompt_ids + res.response_ids == episode
    # Each turn's prompt is the whole conversation so far; its routes start one before its end.
    assert [c[0][0] for c in engine.calls] == [prompt, episode[:8], episode[:12]]
    assert [c[1][0] for c in engine.calls] == [0, 3 + 3 - 1, 8 + 2 - 1]
    # Every token but the last has exactly the row a single-pass prefill of the episode gives
    # (environment tokens included: routed in the prefill of the turn after them). Exact: the
    # scripted routes are a function of (position, token), so any misplaced row differs.
    assert res.routes.shape == (len(episode) - 1, LAYERS, TOPK)
    assert torch.equal(res.routes, routes_of(episode))
    assert not torch.equal(res.routes[1:], routes_of(episode)[:-1])  # guard: a shift by one is caught
    model = [True] * 3 + [False] * 2 + [True] * 2 + [False] * 2 + [True] * 4
    assert res.response_mask == model
    # response_len_mean counts the model's tokens, not the environment's
    assert res.model_tokens == sum(model) == 9 < len(res.response_ids) == len(model)
    [sample] = _build_samples([res], torch.tensor([1.0]), use_routes=True)
    # Loss position i predicts token i+1: the mask is over positions len(prompt)-1 ... and marks
    # exactly the predictions of model tokens.
    expected = torch.tensor([False] * (len(prompt) - 1) + model)
    assert torch.equal(sample.loss_mask, expected)
    assert sample.loss_mask.sum() == 9 and (~sample.loss_mask).sum() == len(episode) - 1 - 9
    lp = sample.rollout_log_probs[len(prompt) - 1:]
    tokens = episode[len(prompt):]
    for m, t, v in zip(model, tokens, lp.tolist()):
        assert v == pytest.approx(-t / 100 if m else 0.0)
    assert res.meta["turns"] == 3 and res.meta["tool_calls"] == 2 and res.meta["episode_reward"] == 0.75
    assert res.meta["weight_version"] == "0"  # the oldest turn's


def test_episodes_that_end_early_are_not_generated_again_and_aborts_abort():
    class OneShot(EchoTask):
        def start_episode(self, prompt):
            class Env:
                def step(self, conversation, turn, text, *, final):
                    return EnvStep(done=True, reward=1.0, exact=True)

            return Env()

    engine = ScriptedEngine([[9, 1], [8, 1]])
    res = EpisodeRunner(engine, OneShot(), max_turns=2).generate(
        [[2, 3]], PARAMS, return_routes=True, episodes_of=[_prompt([2, 3])])[0]
    assert engine.calls[1][0] == []  # the engine is still called (a collective), with nothing
    assert res.response_ids == [9, 1] and res.routes.shape[0] == 3 and res.meta["turns"] == 1
    aborted = EpisodeRunner(ScriptedEngine([[9, 1], [8, 1]], abort_turn=1), EchoTask(), max_turns=3).generate(
        [[2, 3]], PARAMS, return_routes=True, episodes_of=[_prompt([2, 3])])[0]
    assert aborted.finish_reason == "abort" and aborted.response_ids == [] and aborted.routes is None


def test_environment_contract_is_enforced():
    class NeverEnds(EchoTask):
        def start_episode(self, prompt):
            class Env:
                def step(self, conversation, turn, text, *, final):
                    return EnvStep(observation=[50])

            return Env()

    with pytest.raises(ValueError, match="did not end the episode on its last turn"):
        EpisodeRunner(ScriptedEngine([[9, 1]]), NeverEnds(), max_turns=1).generate(
            [[2, 3]], PARAMS, return_routes=False, episodes_of=[_prompt([2, 3])])
    with pytest.raises(ValueError, match="needs a multi-turn task"):
        wrap_episodes(object(), build_task({"name": "arithmetic"}), 2)
    engine = object()
    assert wrap_episodes(engine, build_task({"name": "arithmetic"}), 1) is engine


def test_misaligned_turn_routes_are_refused():
    class Shifted(ScriptedEngine):
        def generate(self, prompts, params, *, return_routes, routes_start=None):
            return super().generate(prompts, params, return_routes=return_routes,
                                    routes_start=[s + 1 if s else 0 for s in routes_start])

    with pytest.raises(ValueError, match="rows"):
        EpisodeRunner(Shifted([[9, 1], [8, 1]]), EchoTask(), max_turns=2).generate(
            [[2, 3]], PARAMS, return_routes=True, episodes_of=[_prompt([2, 3])])


def test_calculator_environment_and_metrics():
    task = build_task({"name": "calculator"})
    tok = task.tokenizer
    prompt = next(task.prompts(seed=0))
    a, b = prompt.meta["a"], prompt.meta["b"]
    call = tok.encode(f"?{a}+{b}") + [tok.eos_id]
    answer = tok.encode(prompt.answer) + [tok.eos_id]
    assert task.reference_response(prompt) == call + tok.encode(f">{a + b};") + answer
    script = [call, answer]
    res = EpisodeRunner(ScriptedEngine(script), task, max_turns=3).generate(
        [prompt.ids], PARAMS, return_routes=False, episodes_of=[prompt])[0]
    obs = tok.encode(f">{a + b};")
    assert res.response_ids == call + obs + answer
    assert res.meta["episode_reward"] == 1.0 and res.meta["episode_exact"] and res.meta["tool_calls"] == 1
    # A tool call on the last turn ends the episode with nothing; a wrong number gets the format credit.
    last = EpisodeRunner(ScriptedEngine([call]), task, max_turns=1).generate(
        [prompt.ids], PARAMS, return_routes=False, episodes_of=[prompt])[0]
    assert last.meta["episode_reward"] == 0.0 and last.meta["tool_calls"] == 1
    wrong = tok.encode(str(a + b + 1)) + [tok.eos_id]
    direct = EpisodeRunner(ScriptedEngine([wrong]), task, max_turns=3).generate(
        [prompt.ids], PARAMS, return_routes=False, episodes_of=[prompt])[0]
    assert direct.meta["episode_reward"] == pytest.approx(0.1) and direct.meta["turns"] == 1
    m = reduce_episode_metrics(episode_metrics([res, last, direct]))
    assert m["episode/turns_mean"] == pytest.approx(4 / 3)
    assert m["episode/tool_call_rate"] == pytest.approx(2 / 3)
    env_tokens = len(obs)
    model_tokens = len(call) * 2 + len(answer) + len(wrong)
    assert m["episode/env_token_frac"] == pytest.approx(env_tokens / (env_tokens + model_tokens))


def test_calculator_with_a_byte_level_tokenizer_round_trips_its_observation():
    """The task parses decoded text, so any tokenizer works (the real tier uses a BPE one)."""
    from sapo_megatron.tasks.calculator import CalculatorEnv, CalculatorTask
    from sapo_megatron.tasks.tokenizers import ByteTokenizer

    task = CalculatorTask()
    task.tokenizer = ByteTokenizer()
    prompt = task.make_prompt(seed=1, split="train", index=0)
    step = CalculatorEnv(task, prompt).step([], [], f"?{prompt.meta['a']}+{prompt.meta['b']}", final=False)
    assert task.tokenizer.decode(step.observation) == f">{prompt.answer};"


def test_multi_turn_config_keys_are_checked():
    from sapo_megatron.config import ConfigError, load_config
    from sapo_megatron.config.validate import validate

    cfg = load_config(None, ["rollout.max_turns=3", "task.name=calculator"])
    assert cfg.rollout.max_turns == 3
    with pytest.raises(ConfigError, match="rollout.max_turns"):
        load_config(None, ["rollout.max_turns=0"])
    with pytest.raises(ConfigError, match="max_staleness=0 for multi-turn"):
        validate(load_config(None, ["rollout.max_turns=3", "rollout.engine=sglang", "rollout.max_staleness=1",
                                    "rollout.sglang.urls=[http://h:1]", "model.hf_dir=/x"]))


def test_sglang_asks_routes_from_the_start_and_refuses_servers_below_0_5_8():
    from sapo_megatron.rollout.sglang.protocol import ServerInfo, check_routes_start, generate_payload

    first = generate_payload([1, 2, 3], PARAMS, 0, True, 0)
    later = generate_payload([1, 2, 3], PARAMS, 0, True, 2)
    assert "routed_experts_start_len" not in first and later["routed_experts_start_len"] == 2
    assert "routed_experts_start_len" not in generate_payload([1, 2, 3], PARAMS, 0, False, 2)
    info = dict(url="http://old:1", tp_size=1, dp_size=1, pp_size=1, speculative=False, deterministic=None,
                routed_experts=True)
    with pytest.raises(RuntimeError, match=r"0\.5\.7.*routed_experts_start_len.*>= 0\.5\.8"):
        check_routes_start(ServerInfo(version=(0, 5, 7), **info))
    check_routes_start(ServerInfo(version=(0, 5, 8), **info))


def test_calculator_retries_after_a_wrong_answer_when_asked():
    task = build_task({"name": "calculator", "retry_on_wrong": True})
    tok = task.tokenizer
    prompt = next(task.prompts(seed=0))
    wrong = tok.encode(str(int(prompt.answer) + 1)) + [tok.eos_id]
    right = tok.encode(prompt.answer) + [tok.eos_id]
    res = EpisodeRunner(ScriptedEngine([wrong, wrong, right]), task, max_turns=3).generate(
        [prompt.ids], PARAMS, return_routes=False, episodes_of=[prompt])[0]
    retry = tok.encode(">?;")
    assert res.response_ids == wrong + retry + wrong + retry + right
    assert res.meta["episode_reward"] == 1.0 and res.meta["turns"] == 3 and res.meta["tool_calls"] == 0


def test_a_user_reward_scores_the_whole_episode():
    from sapo_megatron.rollout.episodes import is_multi_turn, score_result
    from sapo_megatron.tasks import UserRewardTask

    task = build_task({"name": "calculator", "reward_fn": "tests.test_episodes:_share_of_sevens"})
    assert isinstance(task, UserRewardTask) and is_multi_turn(task)
    assert not is_multi_turn(build_task({"name": "arithmetic", "reward_fn": "tests.test_episodes:_share_of_sevens"}))
    tok = task.tokenizer
    prompt = next(task.prompts(seed=0))
    res = RolloutResult(prompt.ids, tok.encode("77") + [tok.eos_id] + tok.encode(">7;"), [0.0] * 6, "stop",
                        meta={"episode_reward": 0.0, "episode_exact": False}, response_mask=[True] * 3 + [False] * 3)
    score = score_result(task, prompt, res)
    assert score.reward == pytest.approx(3 / 5) and score.exact is False  # "77>7;" decoded, EOS dropped
    assert score_result(task.task, prompt, res).reward == 0.0  # without reward_fn: the environment's


def test_a_user_reward_keeps_the_tasks_cold_start_reference():
    """The cold start of a wrapped task imitates the task's own reference episode (the tool call,
    its observation, the answer), not the bare answer (what it trained on before)."""
    from sapo_megatron.tasks import reference_response_ids

    task = build_task({"name": "calculator", "reward_fn": "tests.test_episodes:_share_of_sevens"})
    prompt = next(task.prompts(seed=0))
    want = task.task.reference_response(prompt)
    assert reference_response_ids(task, prompt) == want
    assert task.tokenizer.decode(want).startswith("?")  # not vacuous: the episode, not the answer
    # A task without its own reference keeps the default (the answer, then EOS).
    plain = build_task({"name": "arithmetic", "reward_fn": "tests.test_episodes:_share_of_sevens"})
    p = next(plain.prompts(seed=0))
    assert reference_response_ids(plain, p)[-1] == plain.tokenizer.eos_id


def _share_of_sevens(prompt_text, response_text, answer, meta):
    return response_text.count("7") / max(len(response_text), 1)
