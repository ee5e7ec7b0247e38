"""The task interface the trainer talks to: tokenizer, prompts, reward, and a resumable stream.

Design choices:
- A task owns its tokenizer, so the trainer never guesses how prompts were encoded and the tiny
  CPU model can take its vocabulary size from ``task.tokenizer.vocab_size``.
- ``Task.prompts`` is an infinite iterator that depends only on ``(seed, split)``. Built-in
  tasks are index-addressable and also accept ``start=`` so that :class:`PromptStream` resumes in
  O(1); a third-party task without ``start`` is resumed by skipping the consumed prompts.
- Tasks are built by name from a registry (``build_task({"name": "arithmetic", ...})``); a
  ``reward_fn: "package.module:function"`` key in any task config replaces the task's reward
  with the user's function (see ``sapo_megatron.tasks.user_reward``).
- Rewards are floats in [0, 1]; tasks with partial credit document their shaping.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

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


def check_split(task_name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"task {task_name!r}: unknown split {split!r}; known splits: {list(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

TaskBuilder = Callable[..., Task]
TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def decorator(builder: TaskBuilder) -> TaskBuilder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = builder
        return builder

    return decorator


def build_task(cfg: dict) -> Task:
    """Builds a task from ``{"name": ..., **options}``; ``reward_fn`` wraps any task's reward."""
    if not isinstance(cfg, dict):
        raise TypeError(f"task config must be a dict like {{'name': 'arithmetic'}}, got {type(cfg).__name__}")
    options = dict(cfg)
    name = options.pop("name", None)
    if name is None:
        raise ValueError(f"task config has no 'name'; known tasks: {sorted(TASKS)}")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    reward_fn = options.pop("reward_fn", None)
    task = TASKS[name](**options)
    if reward_fn is not None:
        from .user_reward import UserRewardTask

        task = UserRewardTask(task, reward_fn)
    return task


def config_from_options(config_cls: type, task_name: str, options: dict[str, Any]):
    """Builds a task's config dataclass, naming unknown options and the known ones."""
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task {task_name!r} got unknown option(s) {unknown}; known options: {known}")
    return config_cls(**options)


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
