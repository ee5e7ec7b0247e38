"""User reward functions for the tier's trainer runs (``task.reward_fn``).

A random tiny model never answers a math question, so the task's own reward is 0 for every
sample: zero advantages, zero gradients, and nothing to sync that differs from the launch
weights. These rewards vary with the response instead, so every step trains.
"""

from __future__ import annotations

import os
import time


def digits(prompt_text: str, response_text: str, answer, meta) -> float:
    """The share of digit characters in the response (varies within each group)."""
    del prompt_text, answer, meta
    if not response_text:
        return 0.0
    return sum(ch.isdigit() for ch in response_text) / len(response_text)


_last_idle = [0.0]


def digits_after_idle(prompt_text: str, response_text: str, answer, meta) -> float:
    """:func:`digits`, after an idle gap of ``$SAPO_TEST_IDLE_S`` seconds once per scoring burst
    (the first call after 10 s without one: once per step): longer than SGLang's 5 s keep-alive,
    so every pooled connection is closed by the server before the next weight push."""
    if time.monotonic() - _last_idle[0] > 10.0:
        time.sleep(float(os.environ.get("SAPO_TEST_IDLE_S", "0")))
        _last_idle[0] = time.monotonic()
    _wait_for_restart()  # every call: the step after a kill may come within 10 s of the last idle
    return digits(prompt_text, response_text, answer, meta)


def _wait_for_restart(limit_s: float = 300.0) -> None:
    """Once the step the test kills after has logged its row (``$SAPO_TEST_ROWS``, the run's
    metrics.jsonl, holds a line) or the kill is armed (``$SAPO_TEST_GATE.armed``), scoring waits
    until ``$SAPO_TEST_GATE.released`` (the server is back): the push after that step then always
    meets the restarted server, however long its start takes on a loaded machine, and also when
    the next step's rollout finished before the test's watcher got to the kill."""
    gate = os.environ.get("SAPO_TEST_GATE")
    if not gate:
        return
    rows = os.environ.get("SAPO_TEST_ROWS")

    def after_the_first_step() -> bool:
        if os.path.exists(gate + ".armed"):
            return True
        try:
            with open(rows) as f:
                return f.read().endswith("\n")
        except (OSError, TypeError):
            return False

    deadline = time.monotonic() + limit_s
    while after_the_first_step() and not os.path.exists(gate + ".released") and time.monotonic() < deadline:
        time.sleep(0.2)


_calls = [0]


def rank_dependent(prompt_text: str, response_text: str, answer, meta) -> float:
    """DP rank 0's groups always vary in reward (kept by ``zero_variance``), rank 1's never do:
    rank 0's quota fills in the first round, rank 1 takes every round."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        return 0.5
    _calls[0] += 1
    return float(_calls[0] % 2)
