"""Rollout engines behind one interface (:mod:`.base`): ``embedded`` and ``sglang``.

``build_engine(cfg, model_chunks, model_cfg, tokenizer)`` picks one by ``rollout.engine``
(a registry). Under torchrun, the SGLang client runs on the first rank of each model-parallel
group only (one group = one data-parallel replica): that rank sends its replica's requests and
broadcasts the results to the rest of the group; weight sync gathers the live shards on every
rank (a collective) and rank 0 tells the servers to load them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from sapo_megatron.rollout.base import RolloutEngine, RolloutResult, RouteSpec, SamplingParams

ENGINES: dict[str, Callable] = {}


def register_engine(name: str):
    def add(fn):
        ENGINES[name] = fn
        return fn

    return add


def route_spec(model_cfg) -> RouteSpec | None:
    if not model_cfg.num_experts:
        return None
    pattern = model_cfg.moe_layer_pattern()
    return RouteSpec(
        num_hidden_layers=model_cfg.num_hidden_layers,
        topk=model_cfg.num_experts_per_tok,
        num_experts=model_cfg.num_experts,
        moe_layers=[i for i, m in enumerate(pattern) if m],
    )


@register_engine("embedded")
def _embedded(cfg, model_chunks, model_cfg, tokenizer):
    from sapo_megatron.rollout.embedded import EmbeddedEngine

    sp = cfg.parallel.sequence_parallel
    lagged = None
    if cfg.rollout.max_staleness > 0:
        # Bounded staleness on CPU: an engine-owned copy sampling with older weights.
        from sapo_megatron.rollout.lagged import LaggedWeights
        from sapo_megatron.routing import attach_routing_replay
        from sapo_megatron.step import build_model_chunks

        copy = build_model_chunks(model_cfg, cfg.parallel, wrap_ddp=False)
        if model_cfg.num_experts:
            for chunk in copy:
                attach_routing_replay(chunk, model_cfg.moe_layer_pattern())
        lagged = LaggedWeights(copy, cfg.rollout.max_staleness, model_chunks)
    return EmbeddedEngine(
        model_chunks,
        num_experts=model_cfg.num_experts or None,
        pad_multiple=cfg.parallel.tensor_model_parallel_size if sp else 1,
        pad_id=tokenizer.pad_id,
        seed=cfg.run.seed,
        lagged=lagged,
    )


class ReplicaSGLang:
    """One SGLang client per model-parallel group; results shared with the group's ranks."""

    def __init__(self, make_engine: Callable[[], object], hf_config: dict, weight_dir: str):
        from megatron.core import parallel_state

        self.hf_config = hf_config
        self.weight_dir = weight_dir
        self.group = parallel_state.get_model_parallel_group()
        self.leader = dist.get_process_group_ranks(self.group)[0]
        # Only the leader connects (and probes the servers); weight sync also needs rank 0.
        needs = dist.get_rank() in (self.leader, 0)
        self.engine = make_engine() if needs else None

    def generate(self, prompts, params: SamplingParams, *, return_routes: bool) -> list[RolloutResult]:
        box = [None]
        if dist.get_rank() == self.leader:
            box = [self.engine.generate(prompts, params, return_routes=return_routes)]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    # Asynchronous use (rollout.max_staleness > 0, trainer/loop.py): the leader's HTTP requests
    # run on one background thread; every torch.distributed call stays on the main thread.
    def submit(self, prompts, params: SamplingParams, *, return_routes: bool) -> None:
        """Start generating on a background thread (leader only; HTTP only); returns at once."""
        if dist.get_rank() == self.leader:
            from concurrent.futures import ThreadPoolExecutor

            if getattr(self, "_pool", None) is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-rollout")
            import time

            now = time.perf_counter()
            # Worker idle since its last batch: the rollout side waiting on the trainer.
            self.idle_s = now - self._done_at if getattr(self, "_done_at", None) is not None else 0.0

            def work():
                start = time.perf_counter()
                try:
                    return self.engine.generate(prompts, params, return_routes=return_routes)
                finally:
                    self._done_at = time.perf_counter()
                    self.generate_s = self._done_at - start

            self._pending = self._pool.submit(work)

    def drain(self) -> None:
        """Wait until the submitted generation is done (no collective): SGLang answers /flush_cache
        with 400 while requests run, so a weight sync must not start before."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            pending.exception()  # blocks; an error is raised by collect()

    def collect(self) -> list[RolloutResult]:
        """The submitted generation's results on every rank of the group (a broadcast)."""
        box = [None]
        if dist.get_rank() == self.leader:
            box = [self._pending.result()]
            self._pending = None
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def update_weights(self, model_chunks, step: int) -> None:
        from sapo_megatron.checkpoint import export_hf

        if dist.get_rank() == 0:
            path = self.engine.write_weights(model_chunks, step)  # calls export_hf (collective)
        else:
            path = os.path.join(os.path.abspath(self.weight_dir), f"step_{step}")
            export_hf(model_chunks, path, self.hf_config)
        if dist.get_rank() == 0:
            self.engine.load_weights(path, step)
        dist.barrier()

    def close(self) -> None:
        self.drain()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()


@register_engine("sglang")
def _sglang(cfg, model_chunks, model_cfg, tokenizer):
    from sapo_megatron.checkpoint import export_hf
    from sapo_megatron.rollout.sglang import SGLangConfig, SGLangEngine

    s = cfg.rollout.sglang
    if cfg.model.ckpt_dir:
        from sapo_megatron.checkpoint import McoreCheckpoint

        hf_config = McoreCheckpoint(cfg.model.ckpt_dir).hf_config
    elif cfg.model.hf_dir:
        hf_config = json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    else:
        raise ValueError(
            "rollout.engine=sglang needs model.hf_dir or model.ckpt_dir: the servers load HF "
            "checkpoints, and weight sync writes the served model's HF config"
        )
    if s.weight_sync != "disk":
        raise ValueError(
            f"rollout.sglang.weight_sync={s.weight_sync!r}: the trainer wires disk sync today; NCCL "
            f"sync is available in SGLangEngine(weight_broadcaster=...) for custom launchers"
        )
    weight_dir = s.weight_dir or str(Path(cfg.run.output_dir) / "sglang_weights")
    config = SGLangConfig(
        urls=list(s.urls), api_key_env=s.api_key_env, concurrency=s.concurrency, timeout_s=s.timeout_s,
        retries=s.retries, backoff_s=s.backoff_s, require_routes=cfg.routing.mode == "R3",
        weight_dir=weight_dir,
    )

    def make_engine():
        return SGLangEngine(
            config,
            route_spec=route_spec(model_cfg),
            weight_writer=lambda chunks, path: export_hf(chunks, path, hf_config),
        )

    return ReplicaSGLang(make_engine, hf_config, weight_dir)


def build_engine(cfg, model_chunks, model_cfg, tokenizer) -> RolloutEngine:
    name = cfg.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"unknown rollout.engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](cfg, model_chunks, model_cfg, tokenizer)


__all__ = ["ENGINES", "RolloutEngine", "RolloutResult", "RouteSpec", "SamplingParams", "build_engine", "register_engine", "route_spec"]
