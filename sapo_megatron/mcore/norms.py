"""A sequence-parallel-capable RMSNorm for the local (non-Transformer-Engine) spec.

Megatron-Core's local spec builds norms through ``WrappedTorchNorm``, which refuses
``sequence_parallel=True`` — and MoE with tensor parallelism requires sequence parallelism in
training. Under SP each TP rank normalises a different slice of the sequence with the same
weight, so the weight's gradient must be summed over TP. Megatron's ``finalize_model_grads``
already does that for every parameter carrying ``sequence_parallel=True``; this norm only has to
set that attribute. The maths is ``torch.nn.RMSNorm``'s, so it matches TE's RMSNorm and HF's
``Qwen3MoeRMSNorm`` in float32.

:func:`with_sp_norms` puts it into a local block spec from ``get_gpt_decoder_block_spec``: every
norm slot (pre-attention, pre-MLP, q/k norms, the final norm). The model builder decides when
(the local spec; the TE spec's norms already handle SP).
"""

from __future__ import annotations

import torch

_NORM_FIELDS = ("input_layernorm", "pre_mlp_layernorm")
_QK_NORM_FIELDS = ("q_layernorm", "k_layernorm")


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


def with_sp_norms(block_spec, qk_layernorm: bool):
    """Replace every norm of a local block spec by :class:`SequenceParallelRMSNorm` (in place)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    norm = ModuleSpec(module=SequenceParallelRMSNorm)
    for layer_spec in block_spec.layer_specs:
        sub = layer_spec.submodules
        for name in _NORM_FIELDS:
            setattr(sub, name, norm)
        if qk_layernorm:
            attn_sub = sub.self_attention.submodules
            for name in _QK_NORM_FIELDS:
                setattr(attn_sub, name, norm)
    if block_spec.layer_norm is not None:
        block_spec.layer_norm = norm
    return block_spec
