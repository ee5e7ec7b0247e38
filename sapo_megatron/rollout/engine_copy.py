"""The embedded engine's own model copy: older weights (staleness), another precision, router noise.

The embedded engine normally samples from the trainer's live chunks, so the train/rollout
mismatch that SAPO's gate, TIS and routing replay exist for is zero. Three real-world sources
of mismatch need the engine to sample from a copy it owns instead, updated only through
``update_weights(source_chunks, version)``; :class:`EngineCopy` is that one abstraction:

- **lag** (``rollout.max_staleness = k``): bounded-staleness asynchronous RL trains on batches
  of an older policy. On CPU we reproduce it deterministically, without threads: at each sync
  the copy loads the weights of version ``max(0, version - k)``. Policy version = RL steps
  completed (0 = the initial weights); the last ``k + 1`` versions are kept as CPU snapshots of
  the trainer's (sharded, fp32) state dicts.
- **dtype** (``rollout.embedded.dtype = bf16``): an inference engine serves bf16 weights and
  computes in bf16 while the trainer keeps fp32 master weights. The copy's modules are cast with
  ``Module.to(torch.bfloat16)``: parameters are bf16, so every Megatron linear, norm and
  attention on CPU computes and returns bf16 activations (Megatron's ``Float16Module`` would
  also cast the inputs, but the embedded engine feeds token ids only, so the cast is the same).
  The sampled logits are bf16; the engine takes their log-softmax in float64, as SGLang takes
  its log-probs in fp32 from bf16 logits.
- **router noise** (``rollout.embedded.router_noise_std``): gaussian noise on the copy's MoE
  router logits stands in for kernel and batch-shape differences (``mcore/router_replay.py``
  installs it; the trainer's routers are never touched), seeded per rollout call.

The copy has the trainer's parallel layout (it runs on the trainer's ranks) and its own routing
controller, so the routes it reports are recorded from its own forward: R3 replays the
engine's routes, R2 the trainer's own.

Resume: the snapshots are the only state that cannot be regenerated (older weights are gone
once the optimizer stepped), so they go into the checkpoint (:meth:`state_dict`, saved per rank
by ``trainer/checkpoint.py``'s ``extra_state``); the noise is reseeded from (seed, step), so a
resumed run continues exactly as the uninterrupted one (tests/test_async.py).
"""

from __future__ import annotations

import torch

# rollout.embedded.dtype -> the torch dtype of the engine copy.
ENGINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _module(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _live_state(chunk) -> dict:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in _module(chunk).state_dict().items()}


def needs_engine_copy(lag: int, dtype: str, router_noise_std: float) -> bool:
    """Whether the embedded engine must sample from a copy rather than the trainer's chunks."""
    return lag > 0 or dtype != "fp32" or router_noise_std > 0


class EngineCopy:
    """The engine's model copy: version ``max(0, version - lag)`` of the trainer, in ``dtype``."""

    def __init__(self, engine_chunks, source_chunks, *, lag: int = 0, dtype: str = "fp32"):
        if lag < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {lag}")
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"rollout.embedded.dtype must be one of {sorted(ENGINE_DTYPES)}, got {dtype!r}")
        self.chunks = engine_chunks
        self.lag = lag
        self.dtype = dtype
        for chunk in self.chunks:
            _module(chunk).to(ENGINE_DTYPES[dtype])
        # Snapshots keep the trainer's own (fp32) values: a later cast never compounds roundings.
        self.snapshots: dict[int, list[dict]] = {0: [_live_state(c) for c in source_chunks]}
        self.version = 0  # the version the engine's copy holds
        self._load(0)

    def _load(self, version: int) -> None:
        for chunk, state in zip(self.chunks, self.snapshots[version]):
            # load_state_dict copies into the copy's own (possibly bf16) parameters: the cast.
            _module(chunk).load_state_dict(state)
        self.version = version

    def update_weights(self, source_chunks, version: int) -> None:
        """The trainer reached ``version``: keep its weights, load ``max(0, version - lag)``."""
        self.snapshots[version] = [_live_state(c) for c in source_chunks]
        target = max(0, version - self.lag)
        self.snapshots = {v: s for v, s in self.snapshots.items() if v >= target}
        self._load(target)

    def state_dict(self) -> dict:
        return {"lag": self.lag, "dtype": self.dtype, "version": self.version, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        if state["lag"] != self.lag:
            raise ValueError(f"the checkpoint's engine copy has rollout.max_staleness={state['lag']}, this run "
                             f"{self.lag}: resume with the same value")
        # Older checkpoints (lag only) were fp32; a changed dtype is fine (snapshots are fp32).
        self.snapshots = state["snapshots"]
        self._load(state["version"])
