"""A user reward function that hangs on one rank on purpose (tests/test_watchdog.py).

``task.reward_fn: "tests.dist.hang_reward:reward"``: the rank named by ``$SAPO_TEST_HANG_RANK``
sleeps forever in its first call, inside the trainer's rollout phase; every other rank scores 0.5.
"""

from __future__ import annotations

import os
import time


def reward(prompt_text: str, response_text: str, answer, meta: dict) -> float:
    if os.environ.get("RANK") == os.environ.get("SAPO_TEST_HANG_RANK"):
        while True:
            time.sleep(3600)
    return 0.5
