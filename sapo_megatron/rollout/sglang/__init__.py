"""The ``sglang`` rollout engine: a client for SGLang servers (>= 0.5.7 for routes; docs/sglang.md).

Layout: :mod:`.config` (``rollout.sglang``, one class), :mod:`.transport` (HTTP, keep-alive,
retries, keys), :mod:`.protocol` (payloads, parsing, version checks), :mod:`.engine` (generate,
never-stale bookkeeping, pause/continue/flush), :mod:`.weight_sync` (disk and distributed),
:mod:`.replica` (the trainer's ranks). It never imports ``sglang``.

Usage (one process)::

    engine = SGLangEngine(SGLangConfig(urls=["http://10.0.0.5:30000"]), route_spec=spec)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=512), return_routes=True)
    results[0].meta["weight_version"]   # the weights that served it

In the trainer, :func:`build` wires it (``rollout.engine: sglang``). Tests:
``pytest tests/test_sglang_client.py tests/test_sglang_weight_sync.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sapo_megatron.rollout.sglang.config import DistributedSection, SGLangConfig
from sapo_megatron.rollout.sglang.engine import SGLangEngine
from sapo_megatron.rollout.sglang.transport import Rejected, Retryable, ServerConfigError
from sapo_megatron.rollout.sglang.weight_sync import WEIGHT_SYNCS, DiskSync, DistributedSync, WeightSync


def served_hf_config(cfg) -> dict:
    """The HF config the servers load (weight sync writes / sends tensors as it says)."""
    if cfg.model.ckpt_dir:
        from sapo_megatron.checkpoint import McoreCheckpoint

        return McoreCheckpoint(cfg.model.ckpt_dir).hf_config
    if cfg.model.hf_dir:
        return json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    raise ValueError("rollout.engine=sglang needs model.hf_dir or model.ckpt_dir: the servers load HF "
                     "checkpoints, and weight sync writes the served model's HF config")


def build(cfg, model_cfg):
    """The trainer's SGLang engine (:class:`~.replica.ReplicaSGLang`), on every rank."""
    from sapo_megatron.rollout import route_spec
    from sapo_megatron.rollout.sglang.replica import ReplicaSGLang

    s = cfg.rollout.sglang
    hf_config = served_hf_config(cfg)

    def make_engine():
        engine = SGLangEngine(s, route_spec=route_spec(model_cfg), require_routes=cfg.routing.mode == "R3")
        if cfg.rollout.partial:  # spans (0.5.19+), and no radix cache under in_place (trainer/partial.py)
            from sapo_megatron.rollout.sglang.protocol import check_partial

            for url in s.urls:
                check_partial(engine.server_info(url), cfg.rollout.partial_pause)
        return engine

    def make_sync(engine):
        if s.weight_sync == "disk":
            weight_dir = s.weight_dir or str(Path(cfg.run.output_dir) / "sglang_weights")
            if s.delta:
                from sapo_megatron.rollout.sglang.weight_sync.delta import DeltaSync

                return DeltaSync(engine, hf_config, s, weight_dir)
            return DiskSync(engine, hf_config, s, weight_dir)
        return WEIGHT_SYNCS[s.weight_sync](engine, hf_config, s)

    return ReplicaSGLang(make_engine, make_sync)


__all__ = [
    "DiskSync",
    "DistributedSection",
    "DistributedSync",
    "Rejected",
    "Retryable",
    "SGLangConfig",
    "SGLangEngine",
    "ServerConfigError",
    "WEIGHT_SYNCS",
    "WeightSync",
    "build",
    "served_hf_config",
]
