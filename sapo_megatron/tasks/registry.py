"""Tasks by name: ``register_task("name")`` on a builder, ``build_task({"name": ..., **options})``.

The registry sits above ``base`` (the interface) and ``user_reward`` (the ``reward_fn`` wrapper):
``build_task`` needs the wrapper and the wrapper needs the interface, so keeping the registry in
``base`` made the two import each other. Built-in tasks register when ``sapo_megatron.tasks``
is imported; a third-party task registers by importing this module::

    from sapo_megatron.tasks.registry import register_task

    @register_task("my_task")
    def build(**options): return MyTask(**options)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .base import Task
from .user_reward import UserRewardTask

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
        task = UserRewardTask(task, reward_fn)
    return task


def config_from_options(config_cls: type, task_name: str, options: dict[str, Any]):
    """Builds a task's config dataclass, naming unknown options and the known ones."""
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task {task_name!r} got unknown option(s) {unknown}; known options: {known}")
    return config_cls(**options)
