"""Multi-turn episodes: the model and an environment take turns; one training sample per episode.

The interface. A multi-turn task (``tasks/``, by name in the task registry) implements
``start_episode(prompt) -> Environment``: one fresh environment per episode. After every model
turn the runner calls ``env.step(conversation_ids, turn_ids, turn_text, final=...)`` with the
whole conversation so far (prompt, earlier turns and observations, this turn), the turn's own
tokens and their text (cut at EOS), and gets an :class:`EnvStep`: observation tokens to append
before the next model turn, or ``done`` with the episode's reward. ``final=True`` (the turn
budget ``rollout.max_turns`` is spent) requires ``done``. Observations are TOKENS, encoded by
the task with its own tokenizer: nothing is ever re-tokenized, so the sample trained on is
exactly the token sequence the engine saw (text round trips through BPE are not exact).

Generation. :class:`EpisodeRunner` wraps any rollout engine and is itself one (``generate``):
each turn sends every live episode's conversation as the prompt. Routes (R3) are asked with a
start length per request (SGLang's ``routed_experts_start_len``, 0.5.8+; the embedded engine
slices the same rows), so each turn returns rows for the NEW tokens only: turn ``k`` starts at
the previous conversation's length minus one, because the last token a turn sampled was never
fed through the model and is first routed in the next turn's prefill, together with the
environment's observation tokens. Environment tokens are therefore routed by the engine, in the
prefill of the turn that follows them, under the same weights; the stitched sample carries
inference routes for every routed token (``routing.codec.concat_turns`` checks that every token
is covered exactly once). A trainer that routed environment tokens itself would attend, in the
replayed model turns, to hidden states the engine never computed.

The sample. ``RolloutResult.response_ids`` is everything after the prompt (model tokens and
observations interleaved), ``response_mask`` marks the model's tokens (the only ones in the
loss), ``response_log_probs`` holds the engine's log-probs of model tokens and 0.0 for
environment tokens (never read: they are masked), ``routes`` has ``len(prompt + response) - 1``
rows. ``meta``: ``episode_reward``, ``episode_exact``, ``turns``, ``tool_calls``,
``weight_version`` (the oldest turn's).

Every rank runs the same episodes on the same results (the engines broadcast them), and every
turn calls the engine even with no live episode on this rank: the embedded engine's lockstep
replicas and SGLang's replica broadcast are collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from sapo_megatron.rollout.base import RolloutResult, SamplingParams
from sapo_megatron.routing import concat_turns


@dataclass
class EnvStep:
    """The environment's answer to one model turn."""

    observation: list[int] = field(default_factory=list)  # tokens before the next model turn
    done: bool = False
    reward: float | None = None  # required when done
    exact: bool | None = None  # the episode's answer is exactly right (None: cannot tell)
    tool_call: bool = False  # this turn called a tool (logged as episode/tool_calls_mean)


@runtime_checkable
class Environment(Protocol):
    def step(self, conversation: list[int], turn: list[int], turn_text: str, *, final: bool) -> EnvStep: ...


def is_multi_turn(task) -> bool:
    return callable(getattr(task, "start_episode", None))


@dataclass
class _Episode:
    prompt: list[int]
    env: Environment
    tokens: list[int]
    mask: list[bool] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    routes: list[torch.Tensor] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    versions: list = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    finish: str | None = None  # set when the episode is over
    reward: float = 0.0
    exact: bool | None = None
    meta: dict = field(default_factory=dict)


class EpisodeRunner:
    """A rollout engine that plays episodes of ``task`` on ``engine`` (module docstring)."""

    def __init__(self, engine, task, max_turns: int):
        if not is_multi_turn(task):
            raise ValueError(f"rollout.max_turns={max_turns} needs a multi-turn task (one with start_episode), "
                             f"but task {task.name!r} is single-turn; set rollout.max_turns=1 or task.name: calculator")
        if max_turns < 1:
            raise ValueError(f"rollout.max_turns must be >= 1, got {max_turns}")
        self.engine = engine
        self.task = task
        self.max_turns = int(max_turns)
        self.tokenizer = task.tokenizer

    def __getattr__(self, name):
        # Everything else (update_weights, begin, copy, step_metrics, state_dict, close) is the
        # engine's. Not its background generation: a turn needs the previous one's result.
        if name in ("submit", "collect", "drain") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["engine"], name)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool,
                 episodes_of) -> list[RolloutResult]:
        """One stitched result per prompt; ``episodes_of`` holds the
        :class:`~sapo_megatron.tasks.Prompt` of each (its environment needs the answer)."""
        if len(episodes_of) != len(prompts):
            raise ValueError(f"EpisodeRunner.generate: {len(prompts)} prompts but {len(episodes_of)} episodes_of")
        envs = [self.task.start_episode(p) for p in episodes_of]
        eps = [_Episode(prompt=list(p), env=env, tokens=list(p)) for p, env in zip(prompts, envs)]
        start_of = {}  # episode -> routes start of its next turn
        for turn in range(self.max_turns):
            live = [i for i, e in enumerate(eps) if e.finish is None]
            starts = [start_of.get(i, 0) for i in live]
            results = self.engine.generate([list(eps[i].tokens) for i in live], params, return_routes=return_routes,
                                           routes_start=starts)
            for i, start, res in zip(live, starts, results):
                start_of[i] = self._take_turn(eps[i], res, start, final=turn == self.max_turns - 1,
                                              return_routes=return_routes)
        return [self._result(e, return_routes) for e in eps]

    def _take_turn(self, ep: _Episode, res: RolloutResult, start: int, *, final: bool, return_routes: bool) -> int:
        ep.turns += 1
        ep.meta.update({k: v for k, v in res.meta.items() if k in ("server", "error")})
        ep.versions.append(res.meta.get("weight_version"))
        ep.meta["num_retractions"] = ep.meta.get("num_retractions", 0) + int(res.meta.get("num_retractions", 0))
        if res.finish_reason == "abort":
            ep.finish = "abort"
            return start
        if len(res.response_log_probs) != len(res.response_ids):
            raise ValueError(f"the engine returned {len(res.response_log_probs)} log-probs for a turn of "
                             f"{len(res.response_ids)} tokens")
        ep.tokens += res.response_ids
        ep.mask += [True] * len(res.response_ids)
        ep.log_probs += list(res.response_log_probs)
        if return_routes:
            ep.routes.append(res.routes)
            ep.starts.append(start)
        turn_ids = list(res.response_ids)
        eos = self.tokenizer.eos_id
        text = self.tokenizer.decode(turn_ids[: turn_ids.index(eos)] if eos in turn_ids else turn_ids)
        out = ep.env.step(list(ep.tokens), turn_ids, text, final=final)
        ep.tool_calls += int(out.tool_call)
        if out.done or final:
            if not out.done:
                raise ValueError(f"task {self.task.name!r}: the environment did not end the episode on its last "
                                 f"turn (final=True, rollout.max_turns={self.max_turns}); it must return done")
            if out.reward is None:
                raise ValueError(f"task {self.task.name!r}: the environment ended an episode without a reward")
            ep.finish, ep.reward, ep.exact = res.finish_reason, float(out.reward), out.exact
            return start
        if not out.observation:
            raise ValueError(f"task {self.task.name!r}: the environment neither ended the episode nor returned "
                             f"observation tokens after turn {ep.turns}")
        next_start = len(ep.tokens) - 1  # the last sampled token is first routed in the next prefill
        ep.tokens += list(out.observation)
        ep.mask += [False] * len(out.observation)
        ep.log_probs += [0.0] * len(out.observation)
        return next_start

    def _result(self, ep: _Episode, return_routes: bool) -> RolloutResult:
        meta = {**ep.meta, "turns": ep.turns, "tool_calls": ep.tool_calls, "episode_reward": ep.reward,
                "episode_exact": ep.exact}
        if ep.versions and ep.versions[0] is not None:
            meta["weight_version"] = ep.versions[0]  # turns run in order: the first is the oldest
        if ep.finish == "abort":
            return RolloutResult(ep.prompt, [], [], "abort", None, meta)
        routes = None
        if return_routes and ep.routes:
            routes = concat_turns(ep.routes, ep.starts)
            expected = len(ep.tokens) - 1
            if routes.shape[0] != expected:
                raise ValueError(f"stitched routes of an episode have {routes.shape[0]} rows, expected {expected} "
                                 f"(prompt {len(ep.prompt)} + response {len(ep.tokens) - len(ep.prompt)} - 1)")
        return RolloutResult(ep.prompt, ep.tokens[len(ep.prompt):], ep.log_probs, ep.finish, routes, meta,
                             response_mask=ep.mask)


def wrap_episodes(engine, task, max_turns: int):
    """``engine`` itself for a single-turn task with ``max_turns == 1``, else an :class:`EpisodeRunner`."""
    if max_turns == 1 and not is_multi_turn(task):
        return engine
    return EpisodeRunner(engine, task, max_turns)


def score_result(task, prompt, result: RolloutResult):
    """A result's :class:`~sapo_megatron.tasks.Score`: an episode's from its environment (or, with
    ``task.reward_fn``, the user's function on the episode's whole response text, environment
    tokens included, exactness still the environment's); a single response's from the task."""
    from sapo_megatron.tasks import Score, UserRewardTask, score_response

    text = task.tokenizer.decode(result.response_ids)
    if "episode_reward" not in result.meta:
        return score_response(task, prompt, result.response_ids, text)
    if isinstance(task, UserRewardTask):
        return Score(task.reward(prompt, result.response_ids, text), result.meta["episode_exact"])
    return Score(result.meta["episode_reward"], result.meta["episode_exact"])


def episode_metrics(results: list[RolloutResult]) -> list[float]:
    """Local sums for ``episode/*`` metrics: episodes, turns, tool calls, episodes with a tool
    call, model tokens, environment tokens (aborted episodes count as episodes only)."""
    done = [r for r in results if r.finish_reason != "abort"]
    model = sum(r.model_tokens for r in done if r.response_mask is not None)
    env = sum(len(r.response_mask) - sum(r.response_mask) for r in done if r.response_mask is not None)
    return [float(len(results)), float(sum(r.meta.get("turns", 0) for r in done)),
            float(sum(r.meta.get("tool_calls", 0) for r in done)),
            float(sum(r.meta.get("tool_calls", 0) > 0 for r in done)), float(model), float(env), float(len(done))]


def reduce_episode_metrics(sums: list[float]) -> dict[str, float]:
    """``episode_metrics`` sums (already reduced over ranks) -> logged metrics."""
    n, turns, calls, with_call, model, env, done = sums
    done = max(done, 1.0)
    return {"episode/turns_mean": turns / done, "episode/tool_calls_mean": calls / done,
            "episode/tool_call_rate": with_call / done, "episode/env_token_frac": env / max(model + env, 1.0)}
