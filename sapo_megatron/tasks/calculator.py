"""``calculator``: arithmetic with a calculator tool the model may call (the multi-turn CPU task).

An episode (``rollout.max_turns`` model turns at most; rollout/episodes.py)::

    prompt      "13+9="
    model       "?13+9" EOS           a tool call: "?" then an expression
    environment ">22;"                the calculator's answer (observation tokens, not trained on)
    model       "22" EOS              a final answer: a number; the episode ends

The model may also answer at once ("22" EOS). Any other turn ends the episode, unless
``retry_on_wrong``: then a wrong or malformed answer gets the observation ">?;" and another turn. A tool call on
the last allowed turn, or a malformed expression, ends it too.

Reward (at the end of the episode, on the final answer; the response is cut at its first EOS):
1.0 the exact answer; ``format_credit`` (default 0.1) a well-formed wrong number; 0.0 otherwise
(no answer, a malformed turn, turns exhausted). ``tool_cost`` (default 0) is subtracted per tool
call, to make a policy that can add prefer not to call the tool.

A supervised cold start (``train.cold_start_steps``) imitates one reference episode per prompt
(``reference_response``: call, calculator answer, final answer); RL then sharpens both turns.

The operands default to 10..49 with ``+``: two-digit sums a tiny model rarely gets right by
itself, so copying the expression into a tool call and the result out of the observation is the
easier road, and the tool-call rate is a visible thing for RL to move.

Tokenizer: ``tokenizer: char`` (default) is the character tokenizer over ``"0123456789+-*=?>; "``
(vocabulary 20); any other value is a Hugging Face tokenizer path (the real-SGLang tier's tiny
model, for instance). Observations are encoded with the task's tokenizer, and parsing reads the
turn's decoded text, so the task is the same with either.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

from sapo_megatron.rollout.episodes import EnvStep

from .base import OPERATORS, Prompt, Score, check_operand_options, check_split
from .registry import config_from_options, register_task
from .tokenizers import CharTokenizer, HFTokenizer

ALPHABET = "0123456789+-*=?>; "
_NUMBER = re.compile(r"-?[0-9]+")
_CALL = re.compile(r"\?\s*(-?[0-9]+)\s*([+\-*])\s*(-?[0-9]+)\s*")


@dataclass
class CalculatorConfig:
    min_operand: int = 10
    max_operand: int = 49
    operators: str = "+"
    format_credit: float = 0.1
    tool_cost: float = 0.0
    # A wrong or malformed answer with turns left gets the observation ">?;" and another try
    # (feedback-and-retry episodes), instead of ending the episode.
    retry_on_wrong: bool = False
    tokenizer: str = "char"

    def __post_init__(self) -> None:
        check_operand_options("calculator", self, ("format_credit", "tool_cost"))


class CalculatorEnv:
    """One episode's environment: answers tool calls, ends on an answer (module docstring)."""

    def __init__(self, task: "CalculatorTask", prompt: Prompt):
        self.task, self.prompt, self.calls = task, prompt, 0

    def step(self, conversation: list[int], turn: list[int], turn_text: str, *, final: bool) -> EnvStep:
        cfg, text = self.task.config, turn_text.strip()
        call = _CALL.fullmatch(text)
        if call is not None:
            self.calls += 1
            if final:  # no turn left to use the result
                return self._end(0.0, False, tool_call=True)
            a, op, b = call.groups()
            value = OPERATORS[op](int(a), int(b))
            return EnvStep(observation=self.task.tokenizer.encode(f">{value};"), tool_call=True)
        if text == self.prompt.answer:
            return self._end(1.0, True)
        if cfg.retry_on_wrong and not final:
            return EnvStep(observation=self.task.tokenizer.encode(">?;"))
        return self._end(cfg.format_credit if _NUMBER.fullmatch(text) else 0.0, False)

    def _end(self, reward: float, exact: bool, *, tool_call: bool = False) -> EnvStep:
        reward = max(0.0, reward - self.task.config.tool_cost * self.calls)
        return EnvStep(done=True, reward=reward, exact=exact, tool_call=tool_call)


class CalculatorTask:
    name = "calculator"

    def __init__(self, config: CalculatorConfig | None = None):
        self.config = config or CalculatorConfig()
        self.tokenizer = CharTokenizer(ALPHABET) if self.config.tokenizer == "char" else HFTokenizer(
            self.config.tokenizer)

    def make_prompt(self, *, seed: int, split: str, index: int) -> Prompt:
        cfg = self.config
        rng = random.Random(f"calculator:{seed}:{split}:{index}")
        a, b = rng.randint(cfg.min_operand, cfg.max_operand), rng.randint(cfg.min_operand, cfg.max_operand)
        op = rng.choice(cfg.operators)
        text = f"{a}{op}{b}="
        return Prompt(uid=f"calculator-{split}-{seed}-{index}", text=text, ids=self.tokenizer.encode(text),
                      answer=str(OPERATORS[op](a, b)), meta={"index": index, "a": a, "b": b, "op": op})

    def prompts(self, *, seed: int, split: str = "train", start: int = 0) -> Iterator[Prompt]:
        check_split(self.name, split)
        index = start
        while True:
            yield self.make_prompt(seed=seed, split=split, index=index)
            index += 1

    def start_episode(self, prompt: Prompt) -> CalculatorEnv:
        return CalculatorEnv(self, prompt)

    def score(self, prompt: Prompt, response_ids: list[int], response_text: str) -> Score:
        """A single turn judged as a direct answer (what a one-turn rollout of this task gets)."""
        eos = self.tokenizer.eos_id
        ids = response_ids[: response_ids.index(eos)] if eos in response_ids else response_ids
        out = CalculatorEnv(self, prompt).step([], list(ids), self.tokenizer.decode(ids), final=True)
        return Score(out.reward, out.exact)

    def reward(self, prompt: Prompt, response_ids: list[int], response_text: str) -> float:
        return self.score(prompt, response_ids, response_text).reward

    def reference_response(self, prompt: Prompt) -> list[int]:
        """A whole reference episode for a supervised cold start: the tool call, the calculator's
        answer, the final answer ("?13+9" EOS ">22;" "22" EOS). The cold start trains on every
        token of it, the observation included (it is a trace to imitate, not an RL sample)."""
        m, eos = prompt.meta, self.tokenizer.eos_id
        tok = self.tokenizer
        return (tok.encode(f"?{m['a']}{m['op']}{m['b']}") + [eos] + tok.encode(f">{prompt.answer};")
                + tok.encode(prompt.answer) + [eos])


@register_task("calculator")
def build_calculator(**options) -> CalculatorTask:
    return CalculatorTask(config_from_options(CalculatorConfig, "calculator", options))
