"""A lagged policy for the embedded engine: it samples with the weights of ``k`` versions ago.

Bounded-staleness asynchronous RL generates step ``t``'s batch while the trainer is still
updating, so the batch comes from an older policy. On CPU the embedded engine reproduces that
deterministically, without threads: it owns a copy of the model (never the trainer's live
chunks) and, at each weight sync, loads the weights of version ``t + 1 - k``.

Policy version = RL steps completed (0 = the initial weights); weights are synced once per RL
step, after its ``updates_per_rollout`` optimizer steps, with ``update_weights(chunks,
version)``. :class:`LaggedWeights` keeps the last ``k + 1`` versions as CPU snapshots of the
trainer's (sharded) state dicts, so the engine's copy is always the snapshot of
``max(0, version - k)``. The same abstraction (an engine-owned copy updated through
``update_weights(version)``) serves other engines that must sample from a copy, e.g. one kept
in another precision.

Resume: the snapshots are the only state that cannot be regenerated (older weights are gone
once the optimizer stepped), so they go into the checkpoint (:meth:`state_dict`, saved per rank
by ``trainer/checkpoint.py``'s ``extra_state``); a resumed run continues exactly as the
uninterrupted one (tests/test_async.py).
"""

from __future__ import annotations

import torch


def _live_state(chunk) -> dict:
    module = chunk.module if hasattr(chunk, "module") else chunk
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in module.state_dict().items()}


class LaggedWeights:
    """The engine's model copy and the last ``lag + 1`` weight versions (see module docstring)."""

    def __init__(self, engine_chunks, lag: int, source_chunks):
        if lag < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {lag}")
        self.chunks = engine_chunks
        self.lag = lag
        self.snapshots: dict[int, list[dict]] = {0: [_live_state(c) for c in source_chunks]}
        self.version = 0  # the version the engine's copy holds
        self._load(0)

    def _load(self, version: int) -> None:
        for chunk, state in zip(self.chunks, self.snapshots[version]):
            module = chunk.module if hasattr(chunk, "module") else chunk
            module.load_state_dict(state)
        self.version = version

    def update_weights(self, source_chunks, version: int) -> None:
        """The trainer reached ``version``: keep its weights, load ``max(0, version - lag)``."""
        self.snapshots[version] = [_live_state(c) for c in source_chunks]
        target = max(0, version - self.lag)
        self.snapshots = {v: s for v, s in self.snapshots.items() if v >= target}
        self._load(target)

    def state_dict(self) -> dict:
        return {"lag": self.lag, "version": self.version, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        if state["lag"] != self.lag:
            raise ValueError(f"the checkpoint's lagged engine has rollout.max_staleness={state['lag']}, this run "
                             f"{self.lag}: resume with the same value")
        self.snapshots = state["snapshots"]
        self._load(state["version"])
