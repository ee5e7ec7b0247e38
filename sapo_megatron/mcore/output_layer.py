"""The last pipeline stage hands back the output layer's input, not logits (fused log-probs).

Why: :func:`sapo_megatron.logprobs.fused_vocab_parallel_log_probs` needs the hidden states the
output layer would multiply and its weight; ``GPTModel.forward`` always runs the output layer,
so its ``[T, V/TP]`` logits (and their gradient, in the backward) would exist anyway.

How, by release (feature-detected, not version-compared):

- megatron-core with ``GPTModel.forward(output_processor=...)`` (0.19): Megatron-Core's own
  extension point. ``_postprocess`` calls the processor with the hidden states, the output
  layer and the output weight instead of running the layer; ours returns the prepared hidden
  states.
- 0.16, which has no such hook: for the duration of one ``model(...)`` call, the output layer
  instance's ``forward`` is replaced by one returning ``(prepared hidden states, None)``;
  ``_postprocess`` then transposes that ``[S, B, H]`` tensor to ``[B, S, H]`` as it would the
  logits. The class and every other instance are untouched, and ``finally`` restores the layer.

"Prepared" is exactly what ``ColumnParallelLinear.forward`` does to its input before its
matmul, so the gradients equal the unfused path's: under sequence parallelism the sequence is
all-gathered (``gather_from_sequence_parallel_region``: reduce-scatter backward), otherwise the
input enters through ``copy_to_tensor_model_parallel_region`` (all-reduce backward), which
completes the fused function's per-shard gradient of the hidden states. Both are identities at
TP = 1.

The output layer is not run, but its forward pre-hooks are, before its weight is read: Megatron
DDP's ``overlap_param_gather`` waits there for the weight's all-gather after an optimizer step
(on 0.16 the layer's ``__call__`` runs them; the 0.19 processor runs them itself).

The weight is the one ``_postprocess`` would pass: the embedding shard with tied embeddings on
the first stage, else ``output_layer.weight`` (with tied embeddings on a later stage, the copy
Megatron keeps in sync over the embedding group). Refused (a clear error, use
``loss.fused_logprobs: false``): multi-token prediction (0.16 would route its heads through the
replaced layer), MuP logit scaling (applied after the output layer) and deferred embedding
wgrad (the output layer's own activation buffer).
"""

from __future__ import annotations

import contextlib
import inspect

__all__ = ["forward_hidden", "has_output_processor", "output_weight", "prepare_hidden"]


def _inner(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def has_output_processor() -> bool:
    """Whether this megatron-core's ``GPTModel.forward`` takes an ``output_processor``."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def prepare_hidden(output_layer, hidden_SBH):
    """The output layer's input as its matmul would see it (see the module docstring)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    group = output_layer.tp_group
    if output_layer.sequence_parallel:
        return gather_from_sequence_parallel_region(hidden_SBH, tensor_parallel_output_grad=True, group=group)
    return copy_to_tensor_model_parallel_region(hidden_SBH, group=group)


def output_weight(model):
    """This rank's output weight shard ``[V/TP, H]``, as ``GPTModel._postprocess`` picks it."""
    inner = _inner(model)
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def _check_supported(inner) -> None:
    config = inner.config
    for flag, why in (("mtp_num_layers", "multi-token prediction"), ("use_mup", "MuP logit scaling"),
                      ("defer_embedding_wgrad_compute", "deferred embedding wgrad")):
        if getattr(config, flag, None):
            raise ValueError(f"fused log-probs do not support {why} (model config {flag}="
                             f"{getattr(config, flag)!r}); set loss.fused_logprobs: false")


def _hidden_processor(*, hidden_states, output_layer, **_):
    # What calling the layer would have triggered (DDP's wait for the weight's all-gather).
    for hook in list(output_layer._forward_pre_hooks.values()):
        hook(output_layer, (hidden_states,))
    return prepare_hidden(output_layer, hidden_states).transpose(0, 1).contiguous()


@contextlib.contextmanager
def _output_layer_returns_its_input(output_layer):
    def forward(input_, weight=None, runtime_gather_output=None):
        return prepare_hidden(output_layer, input_), None

    output_layer.forward = forward
    try:
        yield
    finally:
        del output_layer.forward


def forward_hidden(model, *args, **kwargs):
    """``model(*args, **kwargs)``, returning ``[B, S, H]`` hidden states instead of
    ``[B, S, V/TP]`` logits on the stage that holds the output layer (other stages: unchanged)."""
    inner = _inner(model)
    if not getattr(inner, "post_process", False):
        return model(*args, **kwargs)
    _check_supported(inner)
    if has_output_processor():
        return model(*args, output_processor=_hidden_processor, **kwargs)
    with _output_layer_returns_its_input(inner.output_layer):
        return model(*args, **kwargs)
