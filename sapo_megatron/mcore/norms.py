"""A sequence-parallel-capable RMSNorm for the local (non-Transformer-Engine) spec.

Megatron-Core's local spec builds norms through ``WrappedTorchNorm``, which refuses
``sequence_parallel=True`` — and MoE with tensor parallelism requires sequence parallelism in
training. Under SP each TP rank normalises a different slice of the sequence with the same
weight, so the weight's gradient must be summed over TP. Megatron's ``finalize_model_grads``
already does that for every parameter carrying ``sequence_parallel=True``; this norm only has to
set that attribute. The maths is ``torch.nn.RMSNorm``'s, so it matches TE's RMSNorm and HF's
``Qwen3MoeRMSNorm`` in float32.
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm constructor signature and SP-aware parameters."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"SequenceParallelRMSNorm implements RMSNorm only; config.normalization is "
                f"{config.normalization!r}"
            )
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # Every rank holds the full (replicated) weight; the attribute tells Megatron to
        # all-reduce its gradient over the TP group when the activations are SP-sharded.
        self.weight.sequence_parallel = bool(config.sequence_parallel)
