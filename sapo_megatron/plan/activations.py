"""Activation, logits and route memory of one microbatch, in bytes: pure arithmetic.

Anchor: Megatron-LM's ``megatron/training/theoretical_memory_usage.py`` counts, per transformer
layer and per token, ``h * (18 + 4 * ffn / h)`` bytes under sequence parallelism with selective
recompute (dense GPT: LayerNorm inputs 2 x 2h, QKV input 2h, attention output 2h, the
out-projection input 2h, the MLP's input 2h, its 4h-wide fc1 output and GeLU output, dropout
masks h each). Our models differ from that anchor in four ways, so the terms are re-derived
here from what each autograd node of Megatron-Core's layers saves for backward:

Attention (per token; ``e`` bytes per activation element, ``a``/``g`` query/KV heads of width
``d``, all head counts divided by TP; ``hs = h / TP`` under SP, else ``h``):
- RMSNorm input ``e*hs``; QKV linear input (the norm output; under SP Megatron saves the
  sequence shard and all-gathers it again in backward) ``e*hs``;
- q/k norm inputs ``e*(a+g)*d`` when ``qk_layernorm``;
- flash attention (TE, GPU): q, k, v and the output ``e*(2a+2g)*d`` plus the fp32 log-sum-exp
  ``4a``. The out-projection saves the same output tensor (not counted twice).
- unfused attention (the local spec, CPU): q and k, v expanded to ``a`` heads (GQA is a
  ``repeat_interleave``) ``e*3a*d``, the softmax output ``e*a*S`` per token (``S`` keys: the
  ``S^2`` term; selective recompute of ``core_attn`` drops it), the output ``e*a*d``.
- No dropout masks: our configs run with dropout 0 (torch skips dropout at p = 0).

MoE MLP (the top-k expansion): the norm input ``e*hs`` and the router's input ``e*hs`` (its
fp32 cast ``4*hs`` too when ``moe_router_dtype=fp32``) and fp32 logits ``4*E``, then per routed
copy of a token -- ``k`` of them per token, spread evenly over the EP ranks, so a rank's experts
see ``k * tokens / TP`` copies under SP with ETP = 1 -- the fc1 input ``e*h``, the fc1 output
``e*2f`` (SwiGLU's gate and up), the SwiGLU output ``e*f`` and the fc2 output ``e*h`` (saved by
the multiplication with the routing probabilities): ``e*k*(2h + 3f)`` per token. ETP > 1 divides
``f`` by ETP. Uneven routing puts more on some ranks: the estimate is the balanced mean.
Dense MLP layers: input ``e*hs``, fc1 output ``e*2F/TP``, SwiGLU output ``e*F/TP``.

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
float32 workspace of one chunk of ``logprob_chunk_size`` rows (``None``: about 64 MB). Padded
microbatches (``B > 1``) also make one transposed copy in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

# sapo_megatron.logprobs._DEFAULT_CHUNK_BYTES: the float32 workspace when no chunk size is set.
DEFAULT_LOGPROB_CHUNK_BYTES = 64 * 2**20


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_row_tokens(sample_lengths: list[int], *, tp: int, sequence_parallel: bool, cp: int) -> int:
    """Tokens of one packed row: the sum of its samples' lengths, each sample padded to a
    multiple of ``2 * CP`` (context parallelism), the row to a multiple of TP under SP and of
    ``2 * CP`` (what ``step/batch.py``'s packed collation needs)."""
    sample_multiple = 2 * cp if cp > 1 else 1
    row_multiple = (tp if sequence_parallel else 1) * sample_multiple
    return _round_up(sum(_round_up(n, sample_multiple) for n in sample_lengths), row_multiple)


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
    router_fp32: bool


def _attention(s: Shape, tokens: int, keys: int, flash: bool, selective: bool) -> float:
    e, tp = s.act_bytes, s.tp
    hs = s.hidden / tp if s.sequence_parallel else s.hidden
    a, g, d = s.heads / tp, max(s.kv_heads / tp, 1), s.head_dim
    per = 2 * e * hs
    if s.qk_layernorm:
        per += e * (a + g) * d
    if flash:
        per += e * (2 * a + 2 * g) * d + 4 * a
    else:
        per += e * 4 * a * d  # q, expanded k and v, output
        if not selective:
            per += e * a * keys
    return per * tokens


def _mlp(s: Shape, tokens: int, moe: bool) -> float:
    e, tp = s.act_bytes, s.tp
    hs = s.hidden / tp if s.sequence_parallel else s.hidden
    if not moe:
        return tokens * e * (hs + 3 * s.ffn / tp)
    per = 2 * e * hs + 4 * s.experts + (4 * hs if s.router_fp32 else 0)
    # Routed copies: under SP each rank routes its own token shard; without SP every TP rank
    # routes the same tokens, so its experts see them TP times over (ETP = 1) -- no division.
    copies = s.topk * (tokens / tp if s.sequence_parallel else tokens)
    return tokens * per + copies * e * (2 * s.hidden + 3 * s.moe_ffn / s.etp)


def layer_bytes(s: Shape, tokens: int, moe: bool, *, flash: bool, selective: bool = False) -> float:
    """Bytes one transformer layer saves for backward, for ``tokens`` tokens on this rank."""
    return _attention(s, tokens, tokens, flash, selective) + _mlp(s, tokens, moe)


def layer_input_bytes(s: Shape, tokens: int) -> float:
    hs = s.hidden / s.tp if s.sequence_parallel else s.hidden
    return tokens * s.act_bytes * hs


@dataclass(frozen=True)
class Recompute:
    granularity: str | None = None  # None | "full" | "selective"
    method: str | None = None  # "uniform" | "block"
    num_layers: int = 1


def stage_activation_bytes(s: Shape, tokens: int, moe_pattern: list[int], recompute: Recompute,
                           *, flash: bool) -> tuple[float, float]:
    """(stored, transient) bytes of one microbatch on a stage whose layers are ``moe_pattern``:
    what stays saved until its backward, and what one recomputed block adds in backward."""
    selective = recompute.granularity == "selective"
    full = [layer_bytes(s, tokens, bool(m), flash=flash, selective=selective) for m in moe_pattern]
    if recompute.granularity != "full":
        return sum(full), 0.0
    n = max(recompute.num_layers, 1)
    inp = layer_input_bytes(s, tokens)
    if recompute.method == "block":
        stored = len(full[:n]) * inp + sum(full[n:])
        return stored, (max(full[:n]) if full[:n] else 0.0)
    blocks = [full[i:i + n] for i in range(0, len(full), n)]
    return len(blocks) * inp, max((sum(b) for b in blocks), default=0.0)


def logits_bytes(s: Shape, tokens: int, *, batch: int, logprob_chunk_size: int | None) -> dict[str, float]:
    """The last stage's loss-time tensors for one microbatch: logits, their gradient and the
    float32 log-prob workspace (``sapo_megatron.logprobs``)."""
    vocab_local = s.vocab_padded / s.tp
    logits = tokens * vocab_local * s.act_bytes
    rows = logprob_chunk_size or max(1, DEFAULT_LOGPROB_CHUNK_BYTES // int(4 * vocab_local))
    workspace = min(rows, tokens) * vocab_local * 4
    return {"logits": logits * (2 if batch > 1 else 1), "logits_grad": logits, "logprob_workspace": workspace}


def routes_bytes(moe_layers: int, tokens: int, topk: int, *, replay: bool) -> float:
    """Device copies of replayed routes (int64 expert ids per layer and token, kept for the
    recompute's backward replay); 0 without routing replay."""
    return moe_layers * tokens * topk * 8 if replay else 0.0
