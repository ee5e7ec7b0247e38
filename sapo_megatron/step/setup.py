"""Wrap built model chunks for training: Megatron DDP, the grad-finalisation hook, the optimizer.

Megatron-Core's schedules call ``config.finalize_model_grads_func`` after the last backward;
that is where data-parallel gradient reduction, the TP all-reduce of sequence-parallel norm
weights, the embedding/output tie across pipeline stages and (with
``calculate_per_token_loss``) the division by the step's token count happen. Without it the
step's gradients would be wrong, so these helpers always install it.
"""

from __future__ import annotations

import torch

from sapo_megatron.models import ModelConfig, ParallelConfig, build_gpt_model, to_transformer_config


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, wrap_ddp: bool = True,
                       use_distributed_optimizer: bool = False, overlap: bool | None = None):
    """This rank's model chunks (one per virtual pipeline stage), DDP-wrapped and hooked.

    ``use_distributed_optimizer`` must match the optimizer's setting (Megatron's DDP lays out
    its gradient buffers for the sharded optimizer). ``overlap`` (default: on with CUDA)
    overlaps the gradient reduction with backward and, with the sharded optimizer, the
    parameter all-gather with the next forward.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    config = to_transformer_config(model_cfg, parallel_cfg, on_cpu=not torch.cuda.is_available())
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    stages = list(range(vpp)) if vpp else [None]
    chunks = [build_gpt_model(model_cfg, parallel_cfg, vp_stage=s, transformer_config=config) for s in stages]
    if not wrap_ddp:
        return chunks
    # On GPUs the gradient reduce-scatter runs while backward goes on, and with the sharded
    # optimizer the parameter all-gather while the next forward runs (its forward pre-hooks
    # dispatch and wait bucket by bucket): between a step's updates. Anything that reads the
    # weights outside a forward must call :func:`sync_params` first. On CPU (gloo) both stay
    # synchronous unless asked.
    overlap = torch.cuda.is_available() if overlap is None else overlap
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and use_distributed_optimizer,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def sync_params(model_chunks) -> None:
    """Finish the sharded optimizer's parameter all-gather now.

    With ``overlap_param_gather`` the updated weights reach the model only when the next
    forward's pre-hooks gather them. A weight
    sync, a checkpoint or an engine copy reads them without a forward: call this first (a no-op
    without the overlap). Collective over the data-parallel group.
    """
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(model_chunks, *, lr: float = 1e-6, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    megatron: dict | None = None):
    """Megatron-Core's optimizer (Adam) over ``model_chunks``.

    ``megatron`` passes further ``OptimizerConfig`` fields through (e.g. the distributed
    optimizer and its CPU offload on GPU clusters); unknown names are refused.
    """
    import dataclasses

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=False,
    )
    extra = dict(megatron or {})
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(OptimizerConfig)})
    if unknown:
        raise ValueError(f"optim.megatron has keys that are not Megatron-Core OptimizerConfig fields: {unknown}")
    opt_config = dataclasses.replace(opt_config, **extra)
    return get_megatron_optimizer(opt_config, model_chunks)
