"""``rollout.engine: recorded``: serve rollouts recorded earlier (``sapo-megatron doctor`` writes them).

Why: to put the trainer and the doctor on the SAME tokens. A server's sampling is not
reproducible across runs (batch composition changes the numerics, and so the samples), so the
doctor's figures can only be checked against the trainer's first step when the trainer trains on
the very rollouts the doctor measured: ``rollout.engine=recorded rollout.recorded_path=R.pt``.
It also replays a rollout batch offline (debugging a step without a server), as slime's
``--load-debug-rollout-data`` does.

A recording is ``torch.save`` of a list of dicts (the fields of
:class:`~sapo_megatron.rollout.base.RolloutResult`). A request is answered by the next unused
recorded result with the same prompt tokens (so any DP layout draws its own share); a prompt
with none left is an error naming it. Weight updates are no-ops: the recording is what it is.
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

import torch

from sapo_megatron.rollout.base import RolloutResult, SamplingParams


def save_rollouts(results: list[RolloutResult], path: str | Path) -> Path:
    """Write ``results`` as a recording :class:`RecordedEngine` reads."""
    rows = [{"prompt_ids": list(r.prompt_ids), "response_ids": list(r.response_ids),
             "response_log_probs": [float(x) for x in r.response_log_probs], "finish_reason": r.finish_reason,
             "routes": r.routes, "meta": {k: v for k, v in r.meta.items() if isinstance(v, (int, float, str, list))}}
            for r in results]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return path


def load_rollouts(path: str | Path) -> list[RolloutResult]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rollout.recorded_path {str(path)!r} does not exist (a torch.save'd list of "
                                f"rollouts, as sapo-megatron doctor --out writes)")
    rows = torch.load(path, weights_only=False)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of rollout dicts, got {type(rows).__name__}")
    return [RolloutResult(**row) for row in rows]


class RecordedEngine:
    """Answers ``generate`` from a recording, matched by prompt tokens, in recorded order."""

    def __init__(self, results: list[RolloutResult]):
        self._queues: dict[tuple[int, ...], deque] = defaultdict(deque)
        for r in results:
            self._queues[tuple(r.prompt_ids)].append(r)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool
                 ) -> list[RolloutResult]:
        out = []
        for i, prompt in enumerate(prompts):
            queue = self._queues.get(tuple(prompt))
            if not queue:
                raise LookupError(f"rollout.engine=recorded: no recorded rollout left for prompt {i} "
                                  f"(first tokens {list(prompt)[:8]}); record with the same task, prompts, "
                                  f"seed and rollout.prompts_per_step / samples_per_prompt")
            result = queue.popleft()
            if return_routes and result.routes is None:
                raise ValueError(f"rollout.engine=recorded: the recording of prompt {i} has no routes; "
                                 f"routing.mode=R3 needs a recording made with routes")
            out.append(result)
        return out

    def update_weights(self, model_chunks, version: int) -> None:
        pass

    def close(self) -> None:
        pass
