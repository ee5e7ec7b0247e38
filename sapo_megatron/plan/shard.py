"""Exact parameter counts of one rank's shard, from building it on the meta device.

A rank's share of the model is whatever Megatron-Core builds on it, so we let Megatron build
it: one rank of each stage kind (first, last, and each distinct middle stage: ``stage_kinds``)
is built with the config's
real sizes on the ``meta`` device, under torch's fake process group
(``torch.testing._internal.distributed.fake_pg``) of the config's world size, and its
parameters are counted. No memory is allocated and no collective runs; a 235B shard builds in
well under a second per rank.

What the fake world needs from Megatron (megatron-core 0.16.1):
- ``create_gloo_process_groups=False``: gloo subgroups cannot form on the fake store.
- sequence parallelism off on the local spec: torch's norm asserts under SP on meta. SP moves
  no parameter, so the counts are unchanged.
- ``use_cpu_initialization=True, perform_initialization=False``: parameters are created with
  the ambient device (meta) and never initialised. Without it Megatron names
  ``torch.cuda.current_device()``, which our CPU compatibility layer maps to real CPU memory.
- No DDP, no optimizer: both allocate flat buffers, which the compat layer would put in RAM.

The build runs in a subprocess (``python -m sapo_megatron.plan.shard``, JSON in and out) so that
the fake process group, Megatron's global parallel state and the CPU compat layer never touch
the caller's process (a trainer or a test that measures memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardCounts:
    """Parameters one rank holds (elements, not bytes), split as the optimizer shards them."""

    stage: int  # pipeline rank
    layers: int  # transformer layers built on this stage
    dense: int  # replicated over data parallelism (attention, norms, router, embeddings, head)
    expert: int  # replicated over expert data parallelism only

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_ranks(world_size: int, pp_size: int) -> dict[int, int]:
    """A global rank of every pipeline stage (Megatron's default ``tp-cp-ep-dp-pp`` order puts
    the pipeline rank outermost: rank // (world / PP))."""
    per_stage = world_size // pp_size
    return {stage: stage * per_stage for stage in range(pp_size)}


def stage_kinds(model_cfg, parallel) -> dict[int, int]:
    """Each stage mapped to the first stage built alike (same position class, same layers'
    dense/MoE pattern): only those are built; the others share their counts. Every stage is
    planned, since its activations in flight differ (1F1B: stage p holds PP - p microbatches)."""
    from sapo_megatron.routing.align import stage_layer_range

    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size
    pattern = model_cfg.moe_layer_pattern()
    first, seen = {}, {}
    for p in range(pp):
        layers = tuple(pattern[i] for v in range(vpp or 1) for i in stage_layer_range(
            model_cfg.num_hidden_layers, pp_size=pp, pp_rank=p, vpp_size=vpp, vp_stage=v if vpp else None,
            num_layers_in_first_stage=parallel.num_layers_in_first_pipeline_stage,
            num_layers_in_last_stage=parallel.num_layers_in_last_pipeline_stage))
        kind = (p == 0, p == pp - 1, layers)
        first[p] = seen.setdefault(kind, p)
    return first


def _count(model) -> tuple[int, int]:
    dense = expert = 0
    for param in model.parameters():
        # Megatron marks expert parameters allreduce=False (reduced over expert-DP only).
        if getattr(param, "allreduce", True):
            dense += param.numel()
        else:
            expert += param.numel()
    return dense, expert


def _build_counts(model_dict: dict, parallel_dict: dict, world_size: int) -> list[dict]:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from sapo_megatron.mcore import activate_cpu_compat
    from sapo_megatron.models import ModelConfig, ParallelConfig, to_transformer_config
    from sapo_megatron.models.builder import build_gpt_model
    from sapo_megatron.parallel import model_parallel_sizes

    from megatron.core import parallel_state

    activate_cpu_compat(force=True)
    model_cfg = ModelConfig(**model_dict)
    parallel = ParallelConfig(**{**parallel_dict, "sequence_parallel": False})
    out = []
    kinds = stage_kinds(model_cfg, parallel)
    for stage, rank in stage_ranks(world_size, parallel.pipeline_model_parallel_size).items():
        if kinds[stage] != stage:  # built alike an earlier stage: its counts
            built = next(c for c in out if c["stage"] == kinds[stage])
            out.append({**built, "stage": stage})
            continue
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            parallel_state.initialize_model_parallel(**model_parallel_sizes(parallel), create_gloo_process_groups=False)
            assert parallel_state.get_pipeline_model_parallel_rank() == stage, "rank order changed"
            config = to_transformer_config(model_cfg, parallel, on_cpu=True)
            config.use_cpu_initialization = True
            config.perform_initialization = False
            vpp = parallel.virtual_pipeline_model_parallel_size
            dense = expert = layers = 0
            with torch.device("meta"):
                for vp_stage in (range(vpp) if vpp else [None]):
                    model = build_gpt_model(model_cfg, parallel, vp_stage=vp_stage, transformer_config=config)
                    d, e = _count(model)
                    dense, expert = dense + d, expert + e
                    layers += len(model.decoder.layers)
            out.append(dataclasses.asdict(ShardCounts(stage=stage, layers=layers, dense=dense, expert=expert)))
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return out


_CACHE: dict[str, list[ShardCounts]] = {}


def shard_counts(model_cfg, parallel_cfg, world_size: int, *, timeout_s: float = 300) -> list[ShardCounts]:
    """Every pipeline stage's parameter counts of one rank, from a meta build of each stage kind
    (:func:`stage_kinds`) in a subprocess (remembered per model, layout and world size for this process).
    ``model_cfg`` / ``parallel_cfg``: :class:`ModelConfig` / :class:`ParallelConfig`."""
    request = {"model": dataclasses.asdict(model_cfg), "parallel": dataclasses.asdict(parallel_cfg),
               "world_size": world_size}
    key = json.dumps(request, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _build_in_subprocess(request, timeout_s)
    return list(_CACHE[key])


def _build_in_subprocess(request: dict, timeout_s: float) -> list[ShardCounts]:
    world_size, parallel = request["world_size"], request["parallel"]
    env = dict(os.environ)
    # Import this checkout's package in the child, whatever the installed one is.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run([sys.executable, "-m", "sapo_megatron.plan.shard"], input=json.dumps(request, default=str),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the meta-device build of one rank's shard failed (world {world_size}, "
                           f"parallel {parallel}):\n{proc.stderr[-4000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    return [ShardCounts(**row) for row in json.loads(last)]


def main() -> None:
    request = json.loads(sys.stdin.read())
    rows = _build_counts(request["model"], request["parallel"], request["world_size"])
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
