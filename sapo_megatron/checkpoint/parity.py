"""Logits of a converted Megatron-Core model next to HF transformers' logits (the parity check).

HF transformers is an independent implementation of each architecture, so equal logits in
float32 prove the mapping (names, QKV interleave, gate/up order, router settings). Used by
``tools/compare_logits.py`` and the tests; needs ``transformers`` (a test extra only).
"""

from __future__ import annotations

import os

import torch

from sapo_megatron.checkpoint.mapping import model_config_from_hf
from sapo_megatron.models import ParallelConfig


def causal_mask(seq_len: int) -> torch.Tensor:
    # Megatron convention: True = masked. Passed explicitly because the fused-softmax default
    # mask is built on CUDA (FIELD-NOTES 1).
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool), diagonal=1)


def build_model_for_hf_config(hf_config: dict, parallel: ParallelConfig | None = None) -> list:
    """This rank's model chunks (unwrapped, eval mode) for an HF config; parallelism must be set up."""
    from sapo_megatron.step.setup import build_model_chunks

    chunks = build_model_chunks(model_config_from_hf(hf_config), parallel or ParallelConfig(), wrap_ddp=False)
    for chunk in chunks:
        chunk.eval()
    return chunks


@torch.no_grad()
def mcore_logits(chunks: list, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits ``[batch, seq, vocab]`` on every rank of the pipeline (any TP/PP/EP layout; collective)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids.shape
    inputs = dict(
        input_ids=input_ids,
        position_ids=torch.arange(seq).unsqueeze(0).expand(batch, -1),
        attention_mask=causal_mask(seq),
    )

    def forward_step(data_iterator, model):
        out = model(**next(data_iterator))
        return out, lambda o: (o.sum() * 0, {"logits": o})

    stored = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([inputs]),
        model=chunks,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    logits = None
    if parallel_state.is_pipeline_last_stage():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(stored[0]["logits"]).float()
    box = [logits]
    # Within this rank's pipeline only: data-parallel replicas each have their own last stage.
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


@torch.no_grad()
def hf_logits(hf_dir: str | os.PathLike, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model(input_ids=input_ids).logits.float()


def random_input_ids(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
