"""Checks across sections, run before anything is built.

:func:`validate` needs only the config (``load_config`` calls it); :func:`validate_for_world`
also needs the world size and returns the :class:`BatchPlan` the trainer follows:

    rollout batch  = rollout.prompts_per_step * rollout.samples_per_prompt samples
    minibatch      = rollout batch / train.updates_per_rollout      (one optimizer step each)
    per DP rank    = minibatch / data-parallel size
    microbatches   = per DP rank / train.micro_batch_size           (Megatron's num_microbatches)

Every division must be exact: a remainder would mean dropped samples or uneven optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from sapo_megatron.config.errors import ConfigError
from sapo_megatron.config.schema import TrainConfig


def validate(cfg: TrainConfig) -> None:
    problems: list[str] = []
    try:
        model = cfg.model.resolve()
    except (ValueError, TypeError) as err:
        raise ConfigError([str(err) if str(err).startswith("model") else f"model: {err}"]) from None
    transformer = None
    try:
        import torch

        from sapo_megatron.models.config import to_transformer_config

        # Its divisibility checks (heads % TP, the pipeline stage split, experts % EP, megatron: keys) and
        # Megatron-Core's own TransformerConfig checks, without building anything.
        transformer = to_transformer_config(model, cfg.parallel, on_cpu=not torch.cuda.is_available())
    except (ValueError, AssertionError) as err:
        problems.append(f"model x parallel: {err}")
    dispatcher = getattr(transformer, "moe_token_dispatcher_type", None)
    if (cfg.train.max_tokens_per_microbatch is not None and cfg.train.layout == "padded"
            and cfg.parallel.expert_model_parallel_size > 1 and dispatcher == "allgather"):
        # step/plan.py needs_equal_shapes: the allgather dispatcher gathers hidden states over the
        # expert-parallel group, ranks of other DP replicas, so every rank's microbatch i needs one
        # shape. A budget's padded microbatches hold different sample counts; packed ones are one
        # row each, padded to the longest. Was a ValueError from the first step's plan.
        problems.append(
            f"train.max_tokens_per_microbatch={cfg.train.max_tokens_per_microbatch} with train.layout=padded and "
            f"parallel.expert_model_parallel_size={cfg.parallel.expert_model_parallel_size}: Megatron's allgather "
            f"token dispatcher (the CPU's: alltoall needs CUDA) needs microbatch i to have one shape on every DP "
            f"rank, which only the packed layout gives under a token budget; set train.layout=packed")
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    # The layers of every stage dividing by vpp is checked with the stage split, above.
    if vpp is not None and pp < 2:
        problems.append(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                        f"pipeline_model_parallel_size > 1, got {pp}")
    if cfg.routing.mode != "none" and not any(model.moe_layer_pattern()):
        problems.append(f"routing.mode={cfg.routing.mode} replays MoE routes, but the model has no "
                        f"MoE layers (model.num_experts={model.num_experts}); use routing.mode=none")
    capacity = model.megatron.get("moe_expert_capacity_factor")
    if cfg.routing.mode != "none" and capacity is not None:
        # Megatron drops tokens over an expert's capacity after the router's top-k, i.e. after our
        # replay hook: replayed tokens would be dropped silently while agreement reads 100%.
        problems.append(f"routing.mode={cfg.routing.mode} with model.megatron.moe_expert_capacity_factor={capacity}: "
                        f"the capacity drops tokens after the replayed top-k, so the trainer would not compute "
                        f"what the engine routed; set moe_expert_capacity_factor=null (dropless) or routing.mode=none")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang.urls:
        problems.append("rollout.engine=sglang needs rollout.sglang.urls (the servers' "
                        "http://host:port addresses)")
    if cfg.rollout.max_staleness > 0 and cfg.rollout.engine == "sglang" and cfg.rollout.dynamic_sampling.filter:
        problems.append("rollout.max_staleness > 0 with rollout.engine=sglang generates the next batch in the "
                        "background, one round per step: it cannot be combined with rollout.dynamic_sampling "
                        "(set rollout.dynamic_sampling.filter=null or rollout.max_staleness=0)")
    if cfg.rollout.max_turns > 1 and cfg.rollout.engine == "sglang" and cfg.rollout.max_staleness > 0:
        problems.append(f"rollout.max_turns={cfg.rollout.max_turns} with rollout.engine=sglang and "
                        f"rollout.max_staleness={cfg.rollout.max_staleness}: the background generation runs one "
                        f"turn per request, and an episode's turns wait on the environment; set "
                        f"rollout.max_staleness=0 for multi-turn episodes")
    if cfg.rollout.partial:
        r = cfg.rollout
        if r.engine != "sglang":
            problems.append(f"rollout.partial=true keeps requests running across weight updates on SGLang "
                            f"servers; rollout.engine is {r.engine!r} (set rollout.engine=sglang)")
        if r.max_staleness < 1:
            problems.append(f"rollout.partial=true trains tokens of earlier policy versions: rollout.max_staleness "
                            f"must be >= 1, got {r.max_staleness}")
        if r.dynamic_sampling.filter:
            problems.append("rollout.partial=true cannot be combined with rollout.dynamic_sampling "
                            "(set rollout.dynamic_sampling.filter=null)")
        if r.partial_offpolicy == "tis" and (cfg.loss.tis_cap is None or cfg.train.use_rollout_log_probs):
            problems.append("rollout.partial_offpolicy=tis corrects the tokens of earlier versions with the truncated "
                            "importance weight against the engine's log-probs: set loss.tis_cap (e.g. 2.0) with "
                            "train.use_rollout_log_probs=false, or rollout.partial_offpolicy=mask")
    if cfg.train.advantage in ("grpo", "grpo_no_std", "rloo") and cfg.rollout.samples_per_prompt < 2:
        problems.append(f"train.advantage={cfg.train.advantage} compares samples of the same prompt: "
                        f"rollout.samples_per_prompt must be >= 2, got {cfg.rollout.samples_per_prompt}")
    if cfg.loss.kl_coef > 0 and not cfg.train.use_reference_model:
        problems.append(f"loss.kl_coef={cfg.loss.kl_coef} needs a reference model: set "
                        f"train.use_reference_model=true (or loss.kl_coef=0)")
    if cfg.train.cold_start_steps and cfg.train.use_reference_model:
        # The reference is copied from the initial weights when the trainer is built (and again
        # on resume), before any cold start: a KL to it would pull towards the untrained model.
        problems.append(f"train.cold_start_steps={cfg.train.cold_start_steps} with train.use_reference_model=true: "
                        f"the reference model would be the weights before the cold start; run the cold start "
                        f"first and start RL from its checkpoint (model.ckpt_dir), or set train.cold_start_steps=0")
    if cfg.loss.temperature != cfg.rollout.temperature:
        # The trainer's log-probs must describe the distribution the engine sampled from, or
        # ratios, TIS weights and the train/rollout log-prob gap compare different policies.
        problems.append(f"loss.temperature ({cfg.loss.temperature}) differs from "
                        f"rollout.temperature ({cfg.rollout.temperature}); set both to the same value")
    from sapo_megatron.trainer.schedule import schedule_problems

    problems.extend(schedule_problems(cfg))
    problems += context_parallel_problems(cfg)
    if problems:
        raise ConfigError(problems)


def context_parallel_problems(cfg: TrainConfig, *, transformer_engine: bool | None = None) -> list[str]:
    """Why ``parallel.context_parallel_size > 1`` cannot run with this config, if it cannot.

    Context parallelism needs an attention that exchanges keys and values between CP ranks:
    only Transformer Engine's has one (the local spec's ``DotProductAttention`` asserts CP == 1),
    and THD packing under CP needs TE's ``thd_get_partitioned_indices``. ``transformer_engine``
    defaults to whether TE and CUDA are present (``models.builder.use_transformer_engine``).
    """
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return []
    if transformer_engine is None:
        from sapo_megatron.models.builder import use_transformer_engine

        transformer_engine = use_transformer_engine()
    problems = []
    if not transformer_engine:
        problems.append(
            f"parallel.context_parallel_size={cp} needs Transformer Engine's attention on CUDA: "
            f"the local spec (used without TE) has no context-parallel attention (its "
            f"DotProductAttention asserts context_parallel_size == 1); install transformer-engine "
            f"on a GPU machine or set parallel.context_parallel_size=1")
    if cfg.routing.mode == "R2":
        problems.append(
            f"routing.mode=R2 records routes per token of the whole sequence, which "
            f"parallel.context_parallel_size={cp} splits over ranks; use routing.mode=R3 (the "
            f"rollout engine's routes are sliced for CP) or none")
    if cfg.rollout.engine == "embedded":
        problems.append(
            f"rollout.engine=embedded samples from the trainer's model one whole sequence at a "
            f"time and does not run under parallel.context_parallel_size={cp}; use "
            f"rollout.engine=sglang")
    return problems


@dataclass(frozen=True)
class BatchPlan:
    """How one rollout batch is split, for a given world size (see the module docstring)."""

    world_size: int
    data_parallel_size: int
    expert_data_parallel_size: int
    rollout_batch_size: int  # samples per training step, all ranks
    minibatch_size: int  # samples per optimizer step, all ranks
    samples_per_rank: int  # samples per optimizer step on one DP rank
    num_microbatches: int | None  # per optimizer step on one DP rank (None: a token budget)


def validate_for_world(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Refuse parallel sizes and batch sizes that do not divide ``world_size``; the split."""
    if world_size < 1:
        raise ConfigError([f"world size must be >= 1, got {world_size}"])
    p = cfg.parallel
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)
    etp = p.expert_tensor_parallel_size or tp
    problems = []
    if world_size % (tp * pp * cp):
        problems.append(
            f"world size {world_size} is not divisible by parallel.tensor x pipeline x context "
            f"= {tp} x {pp} x {cp} = {tp * pp * cp}")
    if world_size % (etp * ep * pp):
        problems.append(
            f"world size {world_size} is not divisible by parallel.expert_tensor x expert_model x "
            f"pipeline = {etp} x {ep} x {pp} = {etp * ep * pp}")
    if problems:
        raise ConfigError(problems)
    dp = world_size // (tp * pp * cp)
    r, t = cfg.rollout, cfg.train
    rollout_batch = r.prompts_per_step * r.samples_per_prompt
    split = (f"rollout.prompts_per_step x samples_per_prompt = {r.prompts_per_step} x "
             f"{r.samples_per_prompt} = {rollout_batch} samples")
    if r.prompts_per_step % dp:
        # Each data-parallel rank samples whole prompt groups (GRPO advantages are per group).
        raise ConfigError([f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by the "
                           f"data-parallel size {dp}: each DP rank takes whole prompt groups"])
    if rollout_batch % t.updates_per_rollout:
        raise ConfigError([f"{split} do not split into train.updates_per_rollout="
                           f"{t.updates_per_rollout} equal minibatches"])
    minibatch = rollout_batch // t.updates_per_rollout
    if t.micro_batch_size is None:  # a token budget: microbatch counts vary from step to step
        if (rollout_batch // dp) % t.updates_per_rollout:
            raise ConfigError([f"{split}, {rollout_batch // dp} per data-parallel rank (DP {dp}), do not "
                               f"split into train.updates_per_rollout={t.updates_per_rollout} equal minibatches"])
        return BatchPlan(world_size=world_size, data_parallel_size=dp,
                         expert_data_parallel_size=world_size // (etp * ep * pp), rollout_batch_size=rollout_batch,
                         minibatch_size=minibatch, samples_per_rank=minibatch // dp, num_microbatches=None)
    if minibatch % (dp * t.micro_batch_size):
        raise ConfigError([
            f"{split}, in {t.updates_per_rollout} minibatches of {minibatch}: a minibatch must be "
            f"divisible by data-parallel size x train.micro_batch_size = {dp} x "
            f"{t.micro_batch_size} = {dp * t.micro_batch_size} (world {world_size} / model-parallel "
            f"{tp * pp * cp} = DP {dp})"])
    return BatchPlan(
        world_size=world_size,
        data_parallel_size=dp,
        expert_data_parallel_size=world_size // (etp * ep * pp),
        rollout_batch_size=rollout_batch,
        minibatch_size=minibatch,
        samples_per_rank=minibatch // dp,
        num_microbatches=minibatch // dp // t.micro_batch_size,
    )
