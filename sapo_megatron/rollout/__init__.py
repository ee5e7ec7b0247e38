"""Rollout engines behind one interface (:mod:`.base`): ``embedded``, ``sglang`` and ``recorded``
(rollouts saved earlier, :mod:`.recorded`).

``build_engine(cfg, model_chunks, model_cfg, tokenizer)`` picks one by ``rollout.engine``
(a registry). The SGLang engine and its weight sync live in the :mod:`.sglang` package
(``sglang.replica`` describes how the trainer's ranks share one client per replica).
Multi-turn episodes wrap either engine (:mod:`.episodes`: an environment between turns, one
stitched sample per episode, each turn's routes from ``routes_start`` on).
"""

from __future__ import annotations

from typing import Callable

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

    from sapo_megatron.rollout.engine_copy import needs_engine_copy

    sp = cfg.parallel.sequence_parallel
    emb = cfg.rollout.embedded
    copy, noise = None, []
    if needs_engine_copy(cfg.rollout.max_staleness, emb.dtype, emb.router_noise_std):
        # An engine-owned copy (older weights, bf16, router noise) with the trainer's layout and
        # its own routing controller: its routes are recorded from its own forward.
        from megatron.core import parallel_state

        from sapo_megatron.mcore.router_replay import install_router_noise
        from sapo_megatron.rollout.engine_copy import EngineCopy
        from sapo_megatron.routing import attach_routing_replay
        from sapo_megatron.step import build_model_chunks

        chunks = build_model_chunks(model_cfg, cfg.parallel, wrap_ddp=False)
        if model_cfg.num_experts:
            for chunk in chunks:
                attach_routing_replay(chunk, model_cfg.moe_layer_pattern())
                if emb.router_noise_std > 0:
                    # Ranks that hold other tokens (DP, CP, SP shards) draw other noise; TP ranks
                    # without SP see the same tokens and must draw the same.
                    salt = (parallel_state.get_data_parallel_rank(), parallel_state.get_context_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_rank() if sp else 0)
                    noise += install_router_noise(chunk, emb.router_noise_std, rank_salt=hash(salt) % (2**31))
        copy = EngineCopy(chunks, model_chunks, lag=cfg.rollout.max_staleness, dtype=emb.dtype)
    return EmbeddedEngine(
        model_chunks,
        num_experts=model_cfg.num_experts or None,
        pad_multiple=cfg.parallel.tensor_model_parallel_size if sp else 1,
        pad_id=tokenizer.pad_id,
        seed=cfg.run.seed,
        copy=copy,
        router_noise=noise,
    )


@register_engine("sglang")
def _sglang(cfg, model_chunks, model_cfg, tokenizer):
    from sapo_megatron.rollout import sglang

    return sglang.build(cfg, model_cfg)


@register_engine("recorded")
def _recorded(cfg, model_chunks, model_cfg, tokenizer):
    from sapo_megatron.rollout.recorded import RecordedEngine, load_rollouts

    return RecordedEngine(load_rollouts(cfg.rollout.recorded_path))


def build_engine(cfg, model_chunks, model_cfg, tokenizer) -> RolloutEngine:
    name = cfg.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"unknown rollout.engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](cfg, model_chunks, model_cfg, tokenizer)


__all__ = ["ENGINES", "RolloutEngine", "RolloutResult", "RouteSpec", "SamplingParams", "build_engine", "register_engine", "route_spec"]
