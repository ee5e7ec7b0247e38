"""``arithmetic``: small integer arithmetic with a character tokenizer; the embedded CPU default.

A prompt is ``"3+4="`` and the expected response is ``"7"`` followed by EOS. With the defaults
(operands 0..4, ``+`` only) every answer is one digit and the vocabulary has 16 tokens, so a
randomly initialised policy emits the exact answer about once in 256 samples and the first digit
right about once in 16: RL alone has signal from the first step. Harder settings:
``max_operand=9, operators="+-"`` (two-digit and negative answers with ``allow_negative=True``),
``max_operand=99``, or ``operators="+-*"`` (adds ``*`` to the alphabet, vocabulary 17).

Reward (the response is cut at the first EOS; PAD counts as a stray character):
- 1.0  the response is exactly the answer, e.g. ``"7"``.
- ``partial_credit`` (0.5)  the first number in the response equals the answer but other
  characters surround it, e.g. ``"7+"``, ``" 7"``, ``"07"``.
- ``format_credit`` (0.1)  the response is a well-formed number (``-?[0-9]+``), but wrong.
- 0.0  anything else: empty, garbage, a wrong number with extra characters.
With ``shaping=False`` only the exact answer scores (1.0 or 0.0). ``score`` also says whether the
response is exact (the trainer's ``exact_frac``); ``reference_response`` is the answer + EOS (what
a supervised cold start trains on).

Prompts depend only on ``(seed, split, index)``, so streams are deterministic and resume in O(1).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

from .base import OPERATORS, Prompt, Score, check_operand_options, check_split
from .registry import config_from_options, register_task
from .tokenizers import CharTokenizer

_NUMBER = re.compile(r"-?[0-9]+")


@dataclass
class ArithmeticConfig:
    min_operand: int = 0
    max_operand: int = 4
    operators: str = "+"
    allow_negative: bool = False  # False: for "-", operands are ordered so the answer is >= 0
    shaping: bool = True
    partial_credit: float = 0.5
    format_credit: float = 0.1

    def __post_init__(self) -> None:
        check_operand_options("arithmetic", self, ("partial_credit", "format_credit"))


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig | None = None):
        self.config = config or ArithmeticConfig()
        extra = "*" if "*" in self.config.operators else ""
        self.tokenizer = CharTokenizer("0123456789+-= " + extra)

    def make_prompt(self, *, seed: int, split: str, index: int) -> Prompt:
        cfg = self.config
        # A string seed is hashed with SHA-512, so streams match across processes and runs.
        rng = random.Random(f"arithmetic:{seed}:{split}:{index}")
        a = rng.randint(cfg.min_operand, cfg.max_operand)
        b = rng.randint(cfg.min_operand, cfg.max_operand)
        op = rng.choice(cfg.operators)
        if op == "-" and not cfg.allow_negative and a < b:
            a, b = b, a
        text = f"{a}{op}{b}="
        answer = str(OPERATORS[op](a, b))
        return Prompt(uid=f"arithmetic-{split}-{seed}-{index}", text=text, ids=self.tokenizer.encode(text),
                      answer=answer, meta={"index": index, "a": a, "b": b, "op": op})

    def prompts(self, *, seed: int, split: str = "train", start: int = 0) -> Iterator[Prompt]:
        check_split(self.name, split)
        index = start
        while True:
            yield self.make_prompt(seed=seed, split=split, index=index)
            index += 1

    def reward(self, prompt: Prompt, response_ids: list[int], response_text: str) -> float:
        return arithmetic_reward(self.tokenizer, prompt.answer, response_ids, self.config)

    def score(self, prompt: Prompt, response_ids: list[int], response_text: str) -> Score:
        reward = self.reward(prompt, response_ids, response_text)
        # Compare the text, not the reward: partial_credit may be configured up to 1.0.
        return Score(reward, _cut_at_eos(self.tokenizer, response_ids) == prompt.answer)

    def reference_response(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt.answer) + [self.tokenizer.eos_id]


def _cut_at_eos(tokenizer: CharTokenizer, response_ids: list[int]) -> str:
    """The response's text up to its first EOS; PAD becomes "\\0" so "7<pad>" cannot look exact."""
    ids = list(response_ids)
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return "".join(tokenizer.char(i) or "\0" for i in ids)


def arithmetic_reward(tokenizer: CharTokenizer, answer: str, response_ids: list[int],
                      config: ArithmeticConfig) -> float:
    text = _cut_at_eos(tokenizer, response_ids)
    if text == answer:
        return 1.0
    if not config.shaping:
        return 0.0
    first = _NUMBER.search(text)
    if first is not None and int(first.group()) == int(answer):
        return config.partial_credit
    if _NUMBER.fullmatch(text):
        return config.format_credit
    return 0.0


@register_task("arithmetic")
def build_arithmetic(**options) -> ArithmeticTask:
    return ArithmeticTask(config_from_options(ArithmeticConfig, "arithmetic", options))
