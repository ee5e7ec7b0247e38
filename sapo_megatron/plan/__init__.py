"""Per-rank GPU memory of a training config at its real size, predicted on a CPU.

    sapo-megatron plan --config configs/qwen3_30b_a3b_sapo.yaml [key=value ...] [--json]

    from sapo_megatron.plan import plan_config
    report = plan_config(cfg, world_size=1, gpu_memory_bytes=141e9)   # cfg: a loaded TrainConfig
    report.peak_bytes_per_rank, report.fits, report.to_json()

How: parameter counts are exact, from building one rank of each pipeline-stage kind on the
meta device under a fake process group of the run's world size (``shard.py``); bytes per class
are arithmetic on those counts (``memory.py``: weights, gradients, main parameters, Adam
moments, offload) and on the microbatch shape (``activations.py``: activations under the
configured recompute, logits and the log-prob workspace, replayed routes). The microbatch is
what the trainer would build: ``train.micro_batch_size`` samples of prompt + ``rollout.
max_new_tokens`` tokens, packed into one row of the sum of their lengths (``layout: packed``)
or padded to a ``[B, S]`` block. The world size and any launcher overrides come from the
shipped launcher of the config (``launch.py``) unless given. When that launcher runs SGLang
servers, their side is reported too (bf16 weights per server TP rank, KV cache at the
configured concurrency).

What it does not model: CUDA context and NCCL buffers (~1-3 GB per GPU outside the
allocator), fragmentation, the optimizer step's transients, load imbalance between experts.
The verdict asks for 10% headroom to cover them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sapo_megatron.plan.activations import (
    Recompute,
    Shape,
    fused_logits_bytes,
    logits_bytes,
    packed_row_tokens,
    routes_bytes,
    stage_activation_bytes,
)
from sapo_megatron.plan.launch import Launch, launcher_for
from sapo_megatron.plan.memory import OptimizerLayout, dtype_bytes, model_state_bytes
from sapo_megatron.plan.shard import ShardCounts, shard_counts
from sapo_megatron.routing.compact import storage_dtype
from sapo_megatron.step.batch import round_up, sequence_multiples

GB = 1e9
DEFAULT_GPU_MEMORY_BYTES = 80 * GB  # H100 80 GB: the shipped configs' hardware
HEADROOM = 0.10  # the verdict's margin for what is not modelled (see the module docstring)
DEFAULT_PROMPT_TOKENS = 512
# step/setup.py builds Megatron's DDP with grad_reduce_in_fp32=True (tests check they agree).
GRAD_REDUCE_IN_FP32 = True

__all__ = ["GB", "HEADROOM", "PlanReport", "StagePlan", "load_for_planning", "packed_row_tokens", "plan_config", "plan_file",
           "stated_gpu_memory"]


@dataclass
class StagePlan:
    """One kind of rank (a pipeline stage): its parameters and bytes by class."""

    stage: int
    layers: int
    dense_params: int
    expert_params: int
    device: dict[str, float]  # class -> bytes on the GPU
    host: dict[str, float]  # class -> bytes in host memory

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def peak_bytes(self) -> float:
        return sum(self.device.values())


@dataclass
class SGLangPlan:
    servers: int
    tp: int
    dp: int
    colocated: bool
    weights_bytes_per_gpu: float
    pool_bytes_per_gpu: float  # mem_fraction_static x GPU: weights + KV cache
    kv_bytes_per_token_per_gpu: float
    kv_tokens_capacity: int  # per server replica
    kv_tokens_demand: int  # per server replica at the configured concurrency, every request full length
    fits: bool


@dataclass
class PlanReport:
    config: str
    world_size: int
    layout: dict  # parallel sizes and the derived DP sizes
    microbatch: dict  # rows, tokens per rank, microbatches per step, in-flight under 1F1B
    stages: list[StagePlan]
    gpu_memory_bytes: float
    sglang: SGLangPlan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def params_per_rank(self) -> int:
        return max(s.params for s in self.stages)

    @property
    def peak_bytes_per_rank(self) -> float:
        return max(s.peak_bytes for s in self.stages)

    @property
    def headroom(self) -> float:
        return 1 - self.peak_bytes_per_rank / self.gpu_memory_bytes

    @property
    def fits(self) -> bool:
        return self.headroom >= HEADROOM and (self.sglang is None or self.sglang.fits)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "world_size": self.world_size,
            "params_per_rank": self.params_per_rank,
            "peak_bytes_per_rank": int(self.peak_bytes_per_rank),
            "gpu_memory_bytes": int(self.gpu_memory_bytes),
            "headroom": round(self.headroom, 4),
            "required_headroom": HEADROOM,
            "fits": self.fits,
            "layout": self.layout,
            "microbatch": self.microbatch,
            "stages": [{"stage": s.stage, "layers": s.layers, "dense_params": s.dense_params,
                        "expert_params": s.expert_params, "peak_bytes": int(s.peak_bytes),
                        "device_bytes": {k: int(v) for k, v in s.device.items()},
                        "host_bytes": {k: int(v) for k, v in s.host.items()}} for s in self.stages],
            "sglang": dataclasses.asdict(self.sglang) if self.sglang else None,
            "notes": self.notes,
        }

    def summary_line(self) -> str:
        """The figures a config's ``# plan:`` comment states (tests/test_plan.py compares them)."""
        top = max(self.stages, key=lambda st: st.peak_bytes)
        return (f"params_per_rank {self.params_per_rank / 1e9:.2f}B, weights {top.device['weights'] / GB:.1f} GB, "
                f"gradients {top.device['gradients'] / GB:.1f} GB, peak {self.peak_bytes_per_rank / GB:.1f} GB of "
                f"{self.gpu_memory_bytes / GB:.0f} GB, headroom {self.headroom:.1%}")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        from sapo_megatron.plan.report import format_report

        return format_report(self)


def _stage_layers(model, parallel) -> list[list[int]]:
    """MoE pattern (1 = MoE layer) of each pipeline stage's layers, uneven stages included
    (``parallel.num_layers_in_first/last_pipeline_stage``, as the trainer builds them)."""
    from sapo_megatron.routing.align import stage_layer_range

    pattern = model.moe_layer_pattern()
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size
    first = parallel.num_layers_in_first_pipeline_stage
    last = parallel.num_layers_in_last_pipeline_stage
    return [[pattern[i] for v in range(vpp or 1)
             for i in stage_layer_range(model.num_hidden_layers, pp_size=pp, pp_rank=p, vpp_size=vpp,
                                        vp_stage=v if vpp else None, num_layers_in_first_stage=first,
                                        num_layers_in_last_stage=last)]
            for p in range(pp)]


def _microbatch(cfg, parallel, prompt_tokens: int, dp: int) -> dict:
    train, rollout = cfg.train, cfg.rollout
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    sp = bool(parallel.sequence_parallel)
    sample = prompt_tokens + rollout.max_new_tokens
    samples_per_update = rollout.prompts_per_step * rollout.samples_per_prompt // train.updates_per_rollout
    if train.max_tokens_per_microbatch is not None:
        rows, row_tokens = 1, train.max_tokens_per_microbatch
        per_rank = max(1, samples_per_update // dp)
        num_microbatches = max(1, math.ceil(per_rank * sample / row_tokens))
    elif train.layout == "packed":
        rows = 1
        row_tokens = packed_row_tokens([sample] * train.micro_batch_size, tp=tp, sequence_parallel=sp, cp=cp)
        num_microbatches = max(1, samples_per_update // dp // train.micro_batch_size)
    else:
        multiple, _ = sequence_multiples(tp_size=tp, sequence_parallel=sp, cp_size=cp)
        rows, row_tokens = train.micro_batch_size, round_up(sample, multiple)
        num_microbatches = max(1, samples_per_update // dp // train.micro_batch_size)
    return {"layout": "token_budget" if train.max_tokens_per_microbatch else train.layout,
            "sample_tokens": sample, "prompt_tokens": prompt_tokens, "rows": rows, "row_tokens": row_tokens,
            "tokens_per_rank": rows * row_tokens // cp, "microbatches_per_step": num_microbatches}


def _sglang_plan(launch: Launch, cfg, model, gpu_memory_bytes: float, prompt_tokens: int,
                 total_params: int) -> SGLangPlan:
    tp = launch.sglang_tp
    weights = total_params * 2 / tp  # bf16, experts and attention sharded over the server's TP
    pool = launch.sglang_mem_fraction * gpu_memory_bytes
    kv_heads = max(model.num_key_value_heads / tp, 1)
    kv_per_token = 2 * model.num_hidden_layers * kv_heads * model.kv_channels * 2  # K and V, bf16
    capacity = int(max(pool - weights, 0) // kv_per_token)
    replicas = launch.sglang_servers * launch.sglang_dp
    demand = math.ceil(cfg.rollout.sglang.concurrency / replicas) * (prompt_tokens + cfg.rollout.max_new_tokens)
    # Weights must leave the KV pool room for at least one full-length request; beyond that
    # SGLang queues requests instead of failing (capacity vs demand says how much it queues).
    fits = weights < pool and capacity >= prompt_tokens + cfg.rollout.max_new_tokens
    return SGLangPlan(launch.sglang_servers, tp, launch.sglang_dp, launch.colocated, weights, pool, kv_per_token,
                      capacity, demand, fits)


def plan_config(cfg, *, world_size: int, gpu_memory_bytes: float = DEFAULT_GPU_MEMORY_BYTES,
                prompt_tokens: int = DEFAULT_PROMPT_TOKENS, spec: str = "te",
                launch: Launch | None = None, name: str = "<config>",
                counts: list[ShardCounts] | None = None) -> PlanReport:
    """The memory plan of a loaded ``TrainConfig`` on ``world_size`` ranks.

    ``spec``: ``"te"`` (Transformer Engine's layers: fused attention, TE norms; the GPU clusters)
    or ``"local"`` (Megatron's local spec, as on CPU or a GPU without TE). ``counts``: per-stage
    parameter counts, when the caller already has them (else a meta build in a subprocess).

    A 2-layer slice at Qwen3-30B-A3B widths on one GPU, padded 1 x 4096 tokens::

        cfg = load_config(None, ["model.preset=qwen3-30b-a3b", "model.num_hidden_layers=2",
                                 "train.micro_batch_size=1", "rollout.max_new_tokens=4000"])
        plan_config(cfg, world_size=1, prompt_tokens=96, spec="local").peak_bytes_per_rank
    """
    model = cfg.model.resolve()
    parallel = cfg.parallel
    megatron = dict(model.megatron)
    tp, pp, cp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, parallel.context_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size or tp
    if world_size % (tp * pp * cp) or world_size % (etp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP x PP x CP = {tp * pp * cp} "
                         f"and by ETP x EP x PP = {etp * ep * pp}")
    dp, expert_dp = world_size // (tp * pp), world_size // (etp * ep * pp)  # the optimizer's groups (DP with CP)
    counts = counts or shard_counts(model, parallel, world_size)
    param_bytes = dtype_bytes(model.params_dtype)
    opt = OptimizerLayout.from_megatron(dict(cfg.optim.megatron))
    mb = _microbatch(cfg, parallel, prompt_tokens, world_size // (tp * pp * cp))
    tokens, rows = mb["tokens_per_rank"], mb["rows"]
    shape = Shape(hidden=model.hidden_size, heads=model.num_attention_heads, kv_heads=model.num_key_value_heads,
                  head_dim=model.kv_channels, ffn=model.intermediate_size, moe_ffn=model.moe_intermediate_size,
                  experts=model.num_experts, topk=model.num_experts_per_tok, vocab_padded=model.vocab_size,
                  qk_layernorm=model.qk_layernorm, tp=tp, sequence_parallel=bool(parallel.sequence_parallel),
                  cp=cp, etp=etp, act_bytes=param_bytes,
                  swiglu_fused=bool(megatron.get("bias_activation_fusion", False)))
    recompute = Recompute(megatron.get("recompute_granularity"), megatron.get("recompute_method"),
                          int(megatron.get("recompute_num_layers") or 1))
    layers_by_stage = _stage_layers(model, parallel)
    sglang_cfg = getattr(cfg.rollout, "sglang", None)
    delta = bool(getattr(sglang_cfg, "delta", False)) and cfg.rollout.engine == "sglang"
    replay = cfg.routing.mode in ("R2", "R3")
    route_bytes = storage_dtype(model.num_experts or 1).itemsize
    stages = []
    by_stage = {c.stage: c for c in counts}
    for p, chunks in enumerate(layers_by_stage):
        if p not in by_stage:
            continue
        c = by_stage[p]
        pattern = chunks
        state = model_state_bytes(c.dense, c.expert, param_bytes=param_bytes, grad_reduce_in_fp32=GRAD_REDUCE_IN_FP32,
                                  opt=opt, dp=dp, expert_dp=expert_dp)
        device = {k: v[0] for k, v in state.items()}
        host = {k: v[1] for k, v in state.items() if v[1]}
        if delta:  # the HF tensors this rank last sent, in the served dtype (weight_sync/delta.py)
            host["delta_sync_copy"] = (c.dense + c.expert) * SERVED_BYTES
        in_flight = min(pp - p, mb["microbatches_per_step"])
        stored, transient = stage_activation_bytes(shape, tokens, pattern, recompute, keys=mb["row_tokens"] // cp,
                                                   flash=spec == "te")
        device["activations_stored"] = stored * in_flight
        loss_time = 0.0
        if p == pp - 1:
            loss_bytes = fused_logits_bytes if cfg.loss.fused_logprobs else logits_bytes
            loss_time = sum(loss_bytes(shape, tokens, logprob_chunk_size=cfg.loss.logprob_chunk_size,
                                       local=spec != "te").values())
        # Backward meets the loss's tensors first, then one recomputed block: never both at once.
        device["logits_and_logprobs"] = loss_time
        device["recompute_block"] = transient if transient > loss_time else 0.0
        if device["recompute_block"]:
            device["logits_and_logprobs"] = 0.0
        # Replay targets are this rank's SP shard of the tokens (routing/replay.py slices them).
        route_tokens = tokens // tp if parallel.sequence_parallel else tokens
        device["routes"] = routes_bytes(sum(pattern), route_tokens, model.num_experts_per_tok, replay=replay,
                                        route_bytes=route_bytes) * in_flight
        stages.append(StagePlan(p, len(pattern), c.dense, c.expert, device, host))
    notes = []
    if opt.offload and not opt.precision_aware and param_bytes == 2:
        notes.append("optimizer_cpu_offload without use_precision_aware_optimizer keeps the fp32 main parameters "
                     "on the GPU (upstream distrib_optimizer.py clones shard_main_param on the device)")
    sglang = None
    if launch is not None and launch.sglang_servers:
        sglang = _sglang_plan(launch, cfg, model, gpu_memory_bytes, prompt_tokens, _total_params(model))
    if delta:
        server_tp = launch.sglang_tp if launch is not None and launch.sglang_servers else 1
        per_server = delta_server_host_bytes(_total_params(model), server_tp)
        notes.append(f"delta weight sync: each SGLang server keeps {per_server / GB:.0f} GB of host memory "
                     f"(the bf16 HF model once per TP process, {server_tp}; sapo_sglang/delta_loader.py)")
    layout = {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp, "dp": world_size // (tp * pp * cp),
              "expert_dp": expert_dp, "sequence_parallel": bool(parallel.sequence_parallel),
              "recompute": dataclasses.asdict(recompute), "spec": spec,
              "optimizer": dataclasses.asdict(opt), "grad_reduce_in_fp32": GRAD_REDUCE_IN_FP32,
              "launcher": launch.path if launch else None}
    return PlanReport(name, world_size, layout, mb, stages, float(gpu_memory_bytes), sglang, notes)


SERVED_BYTES = 2  # bf16: the dtype a delta-synced server holds (FP8-served weights refuse delta sync)


def delta_server_host_bytes(total_params: int, server_tp: int) -> float:
    """Host memory of the delta loader per server: every TP process keeps the full HF model."""
    return total_params * SERVED_BYTES * server_tp


def _total_params(model) -> int:
    """All parameters of the unsharded model (the SGLang side holds it all, split over its TP)."""
    from sapo_megatron.plan.hf_count import hf_param_count

    return hf_param_count(model)["total"]


def _placeholder_env(text: str) -> dict[str, str]:
    """Values for the ``${oc.env:NAME}`` references a config makes and the environment lacks:
    the planner reads no file through them."""
    return {name: f"/unset/{name}" for name in re.findall(r"\$\{oc\.env:(\w+)", text) if name not in os.environ}


def load_for_planning(path: str, overrides: list[str] = ()):
    """``load_config(path, overrides)`` without the run's environment: ``${oc.env:...}`` paths the
    planner never reads get placeholders, and an SGLang config gets a placeholder server URL."""
    from sapo_megatron.config import load_config

    text = Path(path).read_text()
    placeholders = ["rollout.sglang.urls=[http://unset:1]"] if "engine: sglang" in text else []
    saved = dict(os.environ)
    os.environ.update(_placeholder_env(text))
    try:
        return load_config(path, [*placeholders, *overrides])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def plan_file(path: str, overrides: list[str] = (), *, world_size: int | None = None,
              launch: Launch | None = None, **kwargs) -> PlanReport:
    """Load ``path`` (+ the launcher's overrides, then ``overrides``) and plan it on the world
    size its shipped launcher runs (``world_size`` / ``launch`` override that), against the GPU
    memory its comments state (``gpu_memory_bytes`` overrides; else 80 GB)."""
    launch = launch or launcher_for(path)
    cfg = load_for_planning(path, [*(launch.overrides if launch else ()), *overrides])
    text = Path(path).read_text()
    if world_size is None:
        world_size = launch.world_size if launch else _minimal_world(cfg.parallel)
    if kwargs.get("gpu_memory_bytes") is None:
        kwargs["gpu_memory_bytes"] = stated_gpu_memory(text) or DEFAULT_GPU_MEMORY_BYTES
    return plan_config(cfg, world_size=world_size, launch=launch, name=str(path), **kwargs)


def stated_gpu_memory(text: str) -> float | None:
    """The GPU memory a config's comments state with its hardware ("H100 80 GB"), in bytes."""
    m = re.search(r"\b(?:A100|H100|H200|H20|B200|GB200|MI300X?)\b[^\n\d]{0,12}(\d+)\s*GB", text)
    return float(m.group(1)) * GB if m else None


def _minimal_world(parallel) -> int:
    tp, pp, cp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, parallel.context_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    return math.lcm(tp * pp * cp, etp * parallel.expert_model_parallel_size * pp)
