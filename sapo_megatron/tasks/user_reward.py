"""User reward functions by import path: ``reward_fn: "package.module:function"`` in a task config.

The function is called as ``fn(prompt_text, response_text, answer, meta) -> float`` and must
return a finite real number in [0, 1]. Values a hair outside (float round-off, 1e-6) are
clamped; anything further out, NaN/inf or a non-number is refused with an error naming the
function, because silently clamping a reward that is on the wrong scale hides a bug. Whether a
response is exact (``exact_frac``) still comes from the wrapped task's ``score``, when it has one.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Callable, Iterator

from .base import Prompt, Score, Task, open_prompts

UserRewardFn = Callable[[str, str, "str | None", dict], float]
_ROUND_OFF = 1e-6


def load_reward_fn(path: str) -> UserRewardFn:
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"reward_fn {path!r} must look like 'package.module:function'")
    module_name, attr_path = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:
        raise ImportError(f"reward_fn {path!r}: cannot import module {module_name!r} "
                          f"({type(e).__name__}: {e})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ImportError(f"reward_fn {path!r}: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"reward_fn {path!r} is a {type(obj).__name__}, not a function")
    return obj


def check_reward(value: object, fn_name: str, uid: str) -> float:
    if not isinstance(value, numbers.Real):  # bool counts: True/False -> 1.0/0.0
        raise TypeError(f"reward_fn {fn_name!r} returned {value!r} ({type(value).__name__}) for prompt {uid!r}; "
                        "expected a float in [0, 1]")
    value = float(value)
    if not math.isfinite(value) or not -_ROUND_OFF <= value <= 1 + _ROUND_OFF:
        raise ValueError(f"reward_fn {fn_name!r} returned {value} for prompt {uid!r}; rewards must be finite "
                         "and in [0, 1]")
    return min(max(value, 0.0), 1.0)


class UserRewardTask:
    """A task whose prompts come from ``task`` and whose reward is the user's function."""

    def __init__(self, task: Task, reward_fn: str):
        self.task = task
        self.name = task.name
        self.tokenizer = task.tokenizer
        self.reward_fn_path = reward_fn
        self.fn = load_reward_fn(reward_fn)

    @property
    def start_episode(self):
        """A multi-turn task stays one (its environment plays the episodes; the user's function
        then scores the whole episode's response text). AttributeError for a single-turn task."""
        return self.task.start_episode

    @property
    def reference_response(self):
        """The wrapped task's cold-start reference (the calculator's whole episode: call,
        observation, answer); without this the cold start fell back to the bare answer + EOS.
        AttributeError for a task without one (``reference_response_ids``' default then)."""
        return self.task.reference_response

    def prompts(self, *, seed: int, split: str = "train", start: int = 0) -> Iterator[Prompt]:
        return open_prompts(self.task, seed=seed, split=split, start=start)

    def reward(self, prompt: Prompt, response_ids: list[int], response_text: str) -> float:
        value = self.fn(prompt.text, response_text, prompt.answer, prompt.meta)
        return check_reward(value, self.reward_fn_path, prompt.uid)

    def score(self, prompt: Prompt, response_ids: list[int], response_text: str) -> Score:
        inner = getattr(self.task, "score", None)
        exact = inner(prompt, response_ids, response_text).exact if inner is not None else None
        return Score(self.reward(prompt, response_ids, response_text), exact)
