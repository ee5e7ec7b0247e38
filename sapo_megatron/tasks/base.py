"""The task interface the trainer talks to: tokenizer, prompts, reward, and a resumable stream.

Design choices:
- A task owns its tokenizer, so the trainer never guesses how prompts were encoded and the tiny
  CPU model can take its vocabulary size from ``task.tokenizer.vocab_size``.
- ``Task.prompts`` is an infinite iterator that depends only on ``(seed, split)``. Built-in
  tasks are index-addressable and also accept ``start=`` so that :class:`PromptStream` resumes in
  O(1); a third-party task without ``start`` is resumed by skipping the consumed prompts.
- Tasks are built by name from a registry (``sapo_megatron.tasks.registry``), which sits above
  this module and ``user_reward`` so that neither imports the other's importer.
- Rewards are floats in [0, 1]; tasks with partial credit document their shaping.
- A shaped reward says little about how often the policy is simply right, so a task may also
  implement ``score(prompt, response_ids, response_text) -> Score`` (the reward and whether the
  answer is exact); the trainer logs the exact share as ``exact_frac`` (:func:`score_response`).
- A supervised cold start trains on reference responses: ``reference_response(prompt) -> ids``
  when the task defines it, else the prompt's ``answer`` encoded and ended by EOS
  (:func:`reference_response_ids`).
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

SPLITS = ("train", "test")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str:
        """Decodes every id (it does not stop at EOS); the caller strips EOS and padding."""
        ...


@dataclass
class Prompt:
    uid: str  # stable id (dataset index / hash) for grouping and logging
    text: str
    ids: list[int]  # the tokenized prompt the trainer feeds to the rollout engine
    answer: str | None  # ground truth when known
    meta: dict = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str
    tokenizer: Tokenizer

    def prompts(self, *, seed: int, split: str = "train") -> Iterator[Prompt]: ...

    def reward(self, prompt: Prompt, response_ids: list[int], response_text: str) -> float: ...


@dataclass(frozen=True)
class Score:
    """One response's reward, and whether its answer is exactly right (None: the task cannot tell)."""

    reward: float
    exact: bool | None = None


def score_response(task: Task, prompt: Prompt, response_ids: list[int], response_text: str) -> Score:
    """``task.score(...)`` when the task implements it, else its reward with exactness unknown."""
    score = getattr(task, "score", None)
    if score is not None:
        return score(prompt, response_ids, response_text)
    return Score(float(task.reward(prompt, response_ids, response_text)))


def reference_response_ids(task: Task, prompt: Prompt) -> list[int]:
    """The response a supervised cold start trains on: ``task.reference_response(prompt)`` when the
    task defines it, else ``prompt.answer`` encoded with the task's tokenizer, then EOS."""
    custom = getattr(task, "reference_response", None)
    if custom is not None:
        return list(custom(prompt))
    if prompt.answer is None:
        raise ValueError(f"task {task.name!r}: prompt {prompt.uid!r} has no answer to train a cold start on "
                         f"(set train.cold_start_steps=0, or give the task a reference_response method)")
    return list(task.tokenizer.encode(prompt.answer)) + [task.tokenizer.eos_id]



# The operators of the two-operand arithmetic tasks (arithmetic, calculator).
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def check_operand_options(task_name: str, config, fractions: tuple[str, ...]) -> None:
    """The options the two-operand tasks share, checked once: the operand range, the operators
    (a non-empty string of :data:`OPERATORS`), and the named fields that must lie in [0, 1]."""
    if not 0 <= config.min_operand <= config.max_operand:
        raise ValueError(f"{task_name}: need 0 <= min_operand <= max_operand, got "
                         f"min_operand={config.min_operand}, max_operand={config.max_operand}")
    bad = sorted(set(config.operators) - set(OPERATORS))
    if not config.operators or bad:
        raise ValueError(f"{task_name}: operators must be a non-empty string of {sorted(OPERATORS)}, "
                         f"got {config.operators!r}")
    for name in fractions:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{task_name}: {name} must be in [0, 1], got {getattr(config, name)}")

def check_split(task_name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"task {task_name!r}: unknown split {split!r}; known splits: {list(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# Resumable stream
# ---------------------------------------------------------------------------------------------


def open_prompts(task: Task, *, seed: int, split: str, start: int) -> Iterator[Prompt]:
    """``task.prompts`` from position ``start``: direct when the task takes ``start``, else skipping."""
    if "start" in inspect.signature(task.prompts).parameters:
        return task.prompts(seed=seed, split=split, start=start)
    return itertools.islice(task.prompts(seed=seed, split=split), start, None)


class PromptStream:
    """Hands out batches of prompts and checkpoints its position.

    The state is ``{"task", "seed", "split", "position"}``: the prompts are a pure function of
    ``(seed, split, position)``, so resuming reproduces the next prompts exactly. Loading a state
    saved for another task, seed or split is refused rather than silently changing the data.
    """

    def __init__(self, task: Task, seed: int, split: str = "train"):
        self.task = task
        self.seed = int(seed)
        self.split = split
        self.position = 0
        self._it = open_prompts(task, seed=self.seed, split=split, start=0)

    def next_batch(self, n: int) -> list[Prompt]:
        if n < 1:
            raise ValueError(f"PromptStream.next_batch: n must be >= 1, got {n}")
        batch = list(itertools.islice(self._it, n))
        if len(batch) != n:
            raise RuntimeError(f"task {self.task.name!r} ended after {self.position + len(batch)} prompts; "
                               "Task.prompts must be infinite")
        self.position += n
        return batch

    def state_dict(self) -> dict:
        return {"task": self.task.name, "seed": self.seed, "split": self.split, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"task", "seed", "split", "position"} - set(state))
        if missing:
            raise ValueError(f"PromptStream state lacks {missing}; got keys {sorted(state)}")
        expected = {"task": self.task.name, "seed": self.seed, "split": self.split}
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(f"PromptStream state was saved with {key}={state[key]!r}, "
                                 f"but this stream has {key}={value!r}")
        if int(state["position"]) < 0:
            raise ValueError(f"PromptStream state has a negative position {state['position']}")
        self.position = int(state["position"])
        self._it = open_prompts(self.task, seed=self.seed, split=self.split, start=self.position)
