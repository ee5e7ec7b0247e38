"""The SAPO training step inside Megatron-Core's parallel schedules."""

from sapo_megatron.step.batch import Microbatch, Sample, collate_packed, collate_padded
from sapo_megatron.step.setup import build_model_chunks, build_optimizer, sync_params
from sapo_megatron.step.run import (
    PolicyLossSpec,
    assign_step_weights,
    loss_func,
    collect_log_probs,
    make_forward_step,
    run_step,
)

__all__ = [
    "Microbatch",
    "PolicyLossSpec",
    "Sample",
    "assign_step_weights",
    "build_model_chunks",
    "build_optimizer",
    "collate_packed",
    "collate_padded",
    "loss_func",
    "collect_log_probs",
    "make_forward_step",
    "sync_params",
    "run_step",
]
