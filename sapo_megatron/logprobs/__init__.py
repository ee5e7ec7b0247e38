"""Token log-probabilities (and entropy) under tensor-parallel vocab shards, chunked, with
hand-written backwards.

- :func:`vocab_parallel_log_probs` (:mod:`.vocab_parallel`): from logits the model already
  produced, ``[..., V/TP]``; never copies or upcasts them.
- :func:`fused_vocab_parallel_log_probs` (:mod:`.fused`): from the output layer's input hidden
  states and its weight shard; the logits exist one ``[chunk, V/TP]`` block at a time, forward
  and backward. The trainer's default (``loss.fused_logprobs``).
- :mod:`.maths`: the statistics, their combination over shards and the closed-form gradient
  both share.
"""

from sapo_megatron.logprobs.fused import fused_vocab_parallel_log_probs
from sapo_megatron.logprobs.maths import DEFAULT_CHUNK_BYTES
from sapo_megatron.logprobs.vocab_parallel import vocab_parallel_log_probs

__all__ = ["DEFAULT_CHUNK_BYTES", "fused_vocab_parallel_log_probs", "vocab_parallel_log_probs"]
