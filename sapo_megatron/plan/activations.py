"""Activation, logits and route memory of one microbatch, in bytes: pure arithmetic.

Anchor: Megatron-LM's ``megatron/training/theoretical_memory_usage.py`` counts, per transformer
layer and per token, ``h * (18 + 4 * ffn / h)`` bytes under sequence parallelism with selective
recompute (dense GPT: LayerNorm inputs 2 x 2h, QKV input 2h, attention output 2h, the
out-projection input 2h, the MLP's input 2h, its 4h-wide fc1 output and GeLU output, dropout
masks h each). Our models differ from that anchor in four ways, so the terms are re-derived
here from what each autograd node of Megatron-Core's layers saves for backward:

Attention (per token; ``e`` bytes per activation element, ``a``/``g`` query/KV heads of width
``d``, all head counts divided by TP; ``hs = h / TP`` under SP, else ``h``):
- the input norm: TE keeps its input ``e*hs``; the local spec's ``torch.nn.RMSNorm``
  decomposes into a float32 copy of the input and the float32 normalised tensor, ``8*hs``
  whatever ``e`` (the same for every norm below);
- the QKV linear's input (the norm output; under SP Megatron saves the sequence shard and
  all-gathers it again in backward) ``e*hs``;
- the QKV output ``e*(a+2g)*d``: q, k and v are views of it and the attention keeps v, so the
  whole tensor stays; the local spec's q/k norms add ``8*(a+g)*d`` (TE's keep views of it);
- flash attention (TE, GPU): the rotated q and k ``e*(a+g)*d``, the output ``e*a*d`` (the
  out-projection saves the same tensor) and the fp32 log-sum-exp ``4a``;
- unfused attention (the local spec, CPU): the rotated q, k and v expanded to ``a`` heads under
  GQA (a ``repeat_interleave``; v stays a view without GQA) and the output, ``e*4a*d`` (``e*3a*d``
  without GQA), and the softmax output per token ``a*S`` (``S`` keys per query: the ``S^2`` term)
  twice when the softmax runs in fp32 for bf16 (``4 + e`` bytes: the fp32 output the softmax
  keeps, the cast the next matmul keeps). Selective recompute of ``core_attn`` drops it.
- No dropout masks: our configs run with dropout 0 (torch skips dropout at p = 0).
Megatron-LM's anchor counts the same kinds of tensors for a dense GPT with LayerNorm, no GQA,
no q/k norms and dropout; ours has GQA, q/k norms and SwiGLU and no dropout.

MLP. The norm as above and the router's input ``e*hs`` and fp32 logits ``4*E``
(``router_gating_linear`` keeps no fp32 copy of its input). Then, the top-k expansion: per
routed copy of a token -- ``k`` of them per token, spread evenly over the EP ranks, so a rank's
experts see ``k * tokens / TP`` copies under SP with ETP = 1 (``k * tokens`` without SP, where
every TP rank routes the same tokens) -- the fc1 input ``e*h``, the fc1 output ``e*2f`` (gate and
up), then unfused SwiGLU keeps ``silu(gate)``, ``up + glu_linear_offset`` and their product, and
the experts keep the product scaled by the routing probability (the fc2 input; the fc2 output is
not kept): ``e*(h + 6f)`` per copy, ``e*(h + 3f)`` with ``bias_activation_fusion`` (the fused
kernel keeps the fc1 output and the fc2 input). ETP > 1 divides ``f`` by ETP. Uneven routing
puts more on some ranks: the estimate is the balanced mean. Dense MLP layers: ``e*5F/TP`` (no
probability scaling), ``e*3F/TP`` fused.

Measured check: tests/test_plan.py runs the real step on CPU (the local spec) under a
live-tensor tracker and agrees within a few percent in fp32 and bf16.

Recompute:
- none: every layer keeps all of the above.
- full, ``uniform`` with ``recompute_num_layers = n``: each block of ``n`` layers keeps only its
  input ``e*hs``; in backward one block is recomputed, so one block's full activations come on
  top (the transient). ``block``: the first ``n`` layers of the stage keep only their input, the
  rest keep everything.
- selective (``core_attn``): the attention core's saved tensors are dropped (the ``S^2`` term of
  unfused attention; flash attention saves little that recompute removes, and we keep it).

THD (packed) and context parallelism: a packed row of ``T`` tokens is a batch of one, so every
term scales with ``T / CP`` tokens per rank, and unfused attention's ``S`` is the row (the
block-diagonal mask is a dense ``[T, T]`` score matrix on the local spec); flash attention's
varlen kernel has no ``S^2`` term.

Pipeline: under 1F1B, stage ``p`` of ``P`` holds the stored activations of ``min(P - p, m)``
microbatches at once (``m`` microbatches per step); the transients (a recomputed block, the
logits) belong to one microbatch.

Logits (last stage): the output layer's ``[T, V/TP]`` logits in the activation dtype, saved by
the log-prob function (``sapo_megatron.logprobs``), their gradient of the same size, and the
float32 workspace of about one chunk of ``logprob_chunk_size`` rows (``None``: about 64 MB), all
alive in the loss's backward, plus the final norm's and the output layer's inputs. (Padded microbatches, ``B > 1``, briefly hold a second, transposed copy
of the logits in the forward, before the gradient and workspace exist: never the peak.) With
``loss.fused_logprobs`` (the default) none of these ``[T, V/TP]`` tensors exists: one chunk or
block of logits at a time and ``[T, H]`` float32 accumulators (:func:`fused_logits_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

# sapo_megatron.logprobs.DEFAULT_CHUNK_BYTES: the float32 workspace when no chunk size is set.
DEFAULT_LOGPROB_CHUNK_BYTES = 64 * 2**20
# sapo_megatron.logprobs.fused: a forward chunk's float32 workspace when no chunk size is set.
FUSED_FORWARD_CHUNK_BYTES = 4 * DEFAULT_LOGPROB_CHUNK_BYTES


def packed_row_tokens(sample_lengths: list[int], *, tp: int, sequence_parallel: bool, cp: int) -> int:
    """Tokens of one packed row, by the trainer's own rule (``step.batch.packed_row_length``): the
    sum of its samples' lengths, each padded to ``2 * CP`` under context parallelism, the row to
    TP under SP (``2 * CP * TP`` with both)."""
    from sapo_megatron.step.batch import packed_row_length, sequence_multiples

    multiple, sample_multiple = sequence_multiples(tp_size=tp, sequence_parallel=sequence_parallel, cp_size=cp)
    return packed_row_length(sample_lengths, multiple, sample_multiple=sample_multiple)


@dataclass(frozen=True)
class Shape:
    """What the activation terms need to know about the model and its parallel layout."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width
    moe_ffn: int  # one expert's width
    experts: int  # 0: a dense model
    topk: int
    vocab_padded: int
    qk_layernorm: bool
    tp: int
    sequence_parallel: bool
    cp: int
    etp: int
    act_bytes: int
    swiglu_fused: bool = False  # bias_activation_fusion


def _norm(s: Shape, elements: float, local: bool) -> float:
    """A norm's saved bytes per token: TE keeps its input (and per-row statistics); the local
    spec's ``torch.nn.RMSNorm`` decomposes into a float32 copy of the input and the float32
    normalised tensor (kept for the weight's gradient), whatever the activation dtype."""
    return elements * (8 if local else s.act_bytes)


def _attention(s: Shape, tokens: int, keys: int, flash: bool, selective: bool) -> float:
    e, tp, local = s.act_bytes, s.tp, not flash
    hs = s.hidden / tp if s.sequence_parallel else s.hidden
    a, g, d = s.heads / tp, max(s.kv_heads / tp, 1), s.head_dim
    per = _norm(s, hs, local) + e * hs + e * (a + 2 * g) * d  # input norm, QKV input, QKV output
    if s.qk_layernorm and local:
        per += _norm(s, (a + g) * d, local)
    if flash:
        per += e * (2 * a + g) * d + 4 * a
    else:
        # rotated q and k (expanded to a heads under GQA, v too; v is a view of the QKV output
        # otherwise), the output; the softmax output in fp32 and its cast back to e.
        per += e * ((4 if g < a else 3) * a * d)
        if not selective:
            per += (e + (4 if e < 4 else 0)) * a * keys
    return per * tokens


def _mlp(s: Shape, tokens: int, moe: bool, local: bool) -> float:
    e, tp = s.act_bytes, s.tp
    hs = s.hidden / tp if s.sequence_parallel else s.hidden
    # fc1 output (2f), then unfused SwiGLU: silu(gate), up + offset, their product (the fc2
    # input of a dense MLP); routed experts also keep the product scaled by the routing
    # probability (the fc2 input). Fused (bias_activation_fusion): fc1 output and fc2 input.
    dense_f, expert_f = (3, 3) if s.swiglu_fused else (5, 6)
    if not moe:
        return tokens * (_norm(s, hs, local) + e * hs + e * dense_f * s.ffn / tp)
    # The router keeps its (params_dtype) input and fp32 logits (router_gating_linear saves
    # no fp32 copy).
    per = _norm(s, hs, local) + e * hs + 4 * s.experts
    # Routed copies: under SP each rank routes its own token shard; without SP every TP rank
    # routes the same tokens, so its experts see them TP times over (ETP = 1) -- no division.
    copies = s.topk * (tokens / tp if s.sequence_parallel else tokens)
    return tokens * per + copies * e * (s.hidden + expert_f * s.moe_ffn / s.etp)


def layer_bytes(s: Shape, tokens: int, moe: bool, *, keys: int, flash: bool, selective: bool = False) -> float:
    """Bytes one transformer layer saves for backward, for ``tokens`` tokens on this rank whose
    queries each see ``keys`` keys (a padded row's length, or a packed row's on the local spec)."""
    return _attention(s, tokens, keys, flash, selective) + _mlp(s, tokens, moe, not flash)


def layer_input_bytes(s: Shape, tokens: int) -> float:
    hs = s.hidden / s.tp if s.sequence_parallel else s.hidden
    return tokens * s.act_bytes * hs


@dataclass(frozen=True)
class Recompute:
    granularity: str | None = None  # None | "full" | "selective"
    method: str | None = None  # "uniform" | "block"
    num_layers: int = 1


def stage_activation_bytes(s: Shape, tokens: int, moe_pattern: list[int], recompute: Recompute,
                           *, keys: int, flash: bool) -> tuple[float, float]:
    """(stored, transient) bytes of one microbatch on a stage whose layers are ``moe_pattern``:
    what stays saved until its backward, and what one recomputed block adds in backward."""
    selective = recompute.granularity == "selective"
    full = [layer_bytes(s, tokens, bool(m), keys=keys, flash=flash, selective=selective) for m in moe_pattern]
    if recompute.granularity != "full":
        return sum(full), 0.0
    n = max(recompute.num_layers, 1)
    inp = layer_input_bytes(s, tokens)
    if recompute.method == "block":
        stored = len(full[:n]) * inp + sum(full[n:])
        return stored, (max(full[:n]) if full[:n] else 0.0)
    blocks = [full[i:i + n] for i in range(0, len(full), n)]
    return len(blocks) * inp, max((sum(b) for b in blocks), default=0.0)


def logits_bytes(s: Shape, tokens: int, *, logprob_chunk_size: int | None, local: bool) -> dict[str, float]:
    """The last stage's loss-time tensors for one microbatch: logits, their gradient, the
    float32 log-prob workspace (``sapo_megatron.logprobs``: one buffer of a chunk of rows in the
    forward; in the backward one for float32 logits, two of half a chunk each otherwise -- but
    never fewer rows than the microbatch has), and the final norm + output layer inputs."""
    vocab_local = s.vocab_padded / s.tp
    logits = tokens * vocab_local * s.act_bytes
    rows = logprob_chunk_size or max(1, DEFAULT_LOGPROB_CHUNK_BYTES // int(4 * vocab_local))
    forward = min(rows, tokens)
    backward = min(rows, tokens) if s.act_bytes == 4 else 2 * min(max(1, rows // 2), tokens)
    hs = s.hidden / s.tp if s.sequence_parallel else s.hidden
    return {"logits": logits, "logits_grad": logits, "logprob_workspace": max(forward, backward) * vocab_local * 4,
            "final_norm_and_head_input": tokens * (_norm(s, hs, local) + s.act_bytes * hs)}


def fused_logits_bytes(s: Shape, tokens: int, *, logprob_chunk_size: int | None, local: bool) -> dict[str, float]:
    """The same for the fused log-probs (``loss.fused_logprobs``, ``sapo_megatron.logprobs.fused``):
    no ``[T, V/TP]`` tensor at all. The forward holds one chunk of logits (activation dtype) and
    its float32 workspace; the backward one near-square block of recomputed logits with its
    float32 softmax and (below float32) gradient buffers, the float32 ``dL/dh`` accumulator
    ``[T, H]`` (and its rounded copy at the end), and one float32 ``[v, H]`` weight-gradient block.
    The larger of the two, with the saved per-token statistics and the layer inputs."""
    from sapo_megatron.logprobs.fused import block_shape

    vocab_local = int(s.vocab_padded // s.tp)
    if logprob_chunk_size:
        rows, elems = logprob_chunk_size, logprob_chunk_size * vocab_local
    else:
        rows, elems = max(1, FUSED_FORWARD_CHUNK_BYTES // (4 * vocab_local)), DEFAULT_LOGPROB_CHUNK_BYTES // 4
    rows = min(rows, tokens)
    forward = rows * vocab_local * (s.act_bytes + 4)
    t, v = block_shape(tokens, vocab_local, elems)
    fp32 = s.act_bytes == 4
    block = t * v * (s.act_bytes + 4 + (0 if fp32 else 4))
    backward = block + tokens * s.hidden * (4 + (0 if fp32 else s.act_bytes)) + (0 if fp32 else v * s.hidden * 4)
    hs = s.hidden / s.tp if s.sequence_parallel else s.hidden
    return {"fused_logprob_workspace": max(forward, backward), "logprob_stats": tokens * 4 * 3,
            "final_norm_and_head_input": tokens * (_norm(s, hs, local) + s.act_bytes * hs)}


def routes_bytes(moe_layers: int, tokens: int, topk: int, *, replay: bool, route_bytes: int = 1) -> float:
    """A microbatch's replayed routes on the device, as ``routing/replay.py`` keeps them: compact
    expert ids (``route_bytes``: ``routing.compact.storage_dtype``, 1 up to 256 experts) per MoE
    layer and token, the replay and padding masks, and one layer's ids widened to int64 while its
    router runs; 0 without routing replay. (R2's recorded routes stay on the device through the
    old-log-prob pass, which stores no activations: not at the training step's peak.)"""
    if not replay:
        return 0.0
    return moe_layers * tokens * topk * route_bytes + 2 * tokens + tokens * topk * 8
