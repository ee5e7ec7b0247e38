"""Log-probs (and entropy) straight from the output layer's input and weight: the logits exist
one block at a time, forward and backward.

Why: the output layer's logits are ``[tokens, V/TP]`` in bf16 plus a gradient of the same size:
at 32k tokens, vocab 151936 and TP 1 that is 10 GB + 10 GB per microbatch, while everything an
RL loss needs from them is two numbers per token. verl (``FusedLinearForPPO``), NeMo-RL
(``use_fused_linear_logprobs``) and SkyRL compute log-probs from the hidden states chunk by
chunk for that reason; so does this module, with the same statistics, all-reduces and
closed-form gradient as :func:`~sapo_megatron.logprobs.vocab_parallel_log_probs`
(:mod:`.maths`).

Design choices
--------------
* Forward: chunks of tokens against the whole local vocab. Per chunk one GEMM
  ``h_c @ W^T`` writes a ``[chunk, V/TP]`` block (in the inputs' dtype, as the output layer
  would), and :func:`~.maths.chunk_stats` turns it into per-row statistics in a float32
  workspace of the same shape. Exact per-row maxima, no online rescaling; then the two small
  all-reduces of :func:`~.maths.combine_stats` (none at TP = 1). Nothing of size ``[T, V]`` is
  saved: only ``lse`` and ``E_p[z]`` per row (plus references to ``hidden`` and ``weight``).
* Backward recomputes the logits, in 2-D blocks ``[t, v]`` of at most one forward chunk's
  elements: vocab blocks outer, token chunks inner. Per block one GEMM recomputes the logits,
  :func:`~.maths.chunk_grad` forms ``dL/dx`` in float32, and two GEMMs accumulate
  ``dL/dh += dx @ W_b`` and ``dL/dW_b += dx^T @ h_c``. Vocab-outer keeps the weight-gradient
  accumulator one block ``[v, H]``: with token chunks outer, bf16 weights would need a float32
  ``[V/TP, H]`` accumulator (at H = 4096, V = 151936: 2.5 GB, a quarter of what fusing saves
  at 8k tokens). Blocks are near square (4096 x 4096 by default), so every GEMM has a long
  inner dimension.
* Precision: float32 inputs accumulate straight into the returned gradients (``addmm_``).
  bf16/fp16 inputs: the GEMMs run in the inputs' dtype (the logits block, like the output
  layer's, is bf16), the softmax maths in float32, and both gradients accumulate across blocks
  in float32 (``[T, H]`` for ``hidden``, one ``[v, H]`` block for ``weight``), rounded once at
  the end.
* Cost: 4 GEMMs of ``T x V/TP x H`` per forward + backward (forward, recompute, two gradients)
  against the unfused path's 3, and the same two ``exp`` per logit. Forward-only passes (old
  log-probs, reference) cost what the unfused forward costs; forward + backward at most 3/4 of
  its speed once GEMM-bound, less the page faults and memory traffic of two ``[T, V]`` tensors
  the unfused path pays (``benchmarks/bench_logprobs.py``, ``docs/performance.md``).
* Default sizes (``chunk_size=None``): forward chunks of 256 MB of float32 (440 tokens at
  V/TP = 151936), backward blocks of 64 MB (``maths.DEFAULT_CHUNK_BYTES``, 4096 x 4096). The
  forward's GEMM has only the chunk's tokens as its outer dimension: on 2 CPU cores 110-token
  chunks ran ~20% slower than one GEMM over all tokens, 440-token chunks as fast (an
  alternating in-process A/B, 880 tokens, H 512, vocab 151936). Both stay far below the
  ``[T, V/TP]`` logits and gradient they replace (10 GB in float32 at T 8192, V 151936).
  ``chunk_size`` sets the tokens per forward chunk, and the backward's blocks hold as many
  elements.
* Tensor parallelism: ``weight`` is this rank's contiguous vocab shard (rank r: ids
  ``[r V/TP, (r+1) V/TP)``), ``hidden`` the full input every TP rank sees (under sequence
  parallelism: the gathered one). The gradient returned for ``hidden`` is this shard's part of
  the sum over the vocab: as with Megatron's ``ColumnParallelLinear``, the caller's
  ``copy_to_tensor_model_parallel_region`` (all-reduce backward) or
  ``gather_from_sequence_parallel_region`` (reduce-scatter backward under SP) completes it.
  :mod:`sapo_megatron.mcore.output_layer` does exactly that for the trainer. The weight's
  gradient is local. Tied embeddings: pass the embedding's shard; autograd adds both uses.
* Temperature: everything on z = x / T; the gradients carry the 1/T.

Run it
------
Single process::

    from sapo_megatron.logprobs import fused_vocab_parallel_log_probs
    logp_T, ent_T = fused_vocab_parallel_log_probs(hidden_TH, lm_head_VH, tokens_T,
                                                   temperature=0.7, with_entropy=True)

Under torchrun, pass the TP group and this rank's weight shard; ``pytest tests/test_logprobs.py``
runs it on 1, 2 and 4 gloo ranks against a float64 full-vocab reference
(``tests/dist/logprobs_worker.py``). Benchmark against the unfused path:
``python benchmarks/bench_logprobs.py --mode fused --tokens 8192 --hidden 2048``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sapo_megatron.logprobs.maths import (
    DEFAULT_CHUNK_BYTES,
    check_options,
    check_target_range,
    check_targets,
    chunk_grad,
    chunk_stats,
    combine_stats,
    grad_coefficients,
    local_targets,
    new_stats,
)

__all__ = ["fused_vocab_parallel_log_probs", "block_shape"]

# Default float32 bytes of a forward chunk (the backward's blocks: maths.DEFAULT_CHUNK_BYTES).
_FORWARD_CHUNK_BYTES = 4 * DEFAULT_CHUNK_BYTES


def block_shape(rows: int, vocab_local: int, elems: int) -> tuple[int, int]:
    """(tokens, vocab columns) of a backward block of at most ``elems`` elements, near square."""
    t = min(rows, max(1, math.isqrt(elems)))
    v = min(vocab_local, max(1, elems // t))
    return min(rows, max(1, elems // v)), v


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, temperature, with_entropy, rows_per_chunk, elems):
        vocab_local, width = weight.shape
        h_NH = hidden.reshape(-1, width)
        rows = h_NH.shape[0]
        device = hidden.device
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        col_N1, here_N = local_targets(targets.reshape(-1), rank * vocab_local, vocab_local)
        inv_t = 1.0 / temperature

        max_N, stats_KN = new_stats(rows, with_entropy, device)
        step = max(1, min(rows, rows_per_chunk))
        x_buf = torch.empty(step * vocab_local, dtype=hidden.dtype, device=device)
        e_buf = torch.empty(step * vocab_local, dtype=torch.float32, device=device)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            n = (hi - lo) * vocab_local
            x_CV = torch.mm(h_NH[lo:hi], weight.t(), out=x_buf[:n].view(hi - lo, vocab_local))
            chunk_stats(x_CV, e_buf[:n].view(hi - lo, vocab_local), col_N1[lo:hi], inv_t,
                        max_N[lo:hi], stats_KN[:, lo:hi])
        del x_buf, e_buf
        lse_N, logp_N, mean_z_N = combine_stats(max_N, stats_KN, here_N, inv_t, tp_group)

        outputs = [logp_N.view(targets.shape)]
        saved = [hidden, weight, targets, lse_N]
        if with_entropy:
            outputs.append(lse_N.sub(mean_z_N).view(targets.shape))
            saved.append(mean_z_N)
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        ctx.rank, ctx.temperature, ctx.elems = rank, temperature, elems
        return tuple(outputs) if with_entropy else outputs[0]

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, targets, lse_N, *rest = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_ent is None) or not (want_h or want_w):
            return (None,) * 8
        vocab_local, width = weight.shape
        h_NH = hidden.reshape(-1, width)
        rows = h_NH.shape[0]
        device, dtype = hidden.device, hidden.dtype
        inv_t = 1.0 / ctx.temperature
        fp32 = dtype == torch.float32

        a_N1, b_N1, onehot_N = grad_coefficients(grad_logp, grad_ent, rest[0] if rest else None, inv_t, rows,
                                                 device)
        if onehot_N is not None:
            col_N1, here_N = local_targets(targets.reshape(-1), ctx.rank * vocab_local, vocab_local)
            onehot_N.mul_(here_N)
        neg_lse_N1 = lse_N.neg().unsqueeze(-1)

        # float32 accumulators: the returned gradients themselves for float32 inputs.
        grad_h = torch.zeros(rows, width, dtype=torch.float32, device=device) if want_h else None
        grad_w = (torch.zeros_like(weight) if fp32 else torch.empty_like(weight)) if want_w else None
        t_step, v_step = block_shape(rows, vocab_local, ctx.elems)
        z_buf = torch.empty(t_step * v_step, dtype=dtype, device=device)
        p_buf = torch.empty(t_step * v_step, dtype=torch.float32, device=device)
        # float32: the gradient block overwrites the recomputed logits in place.
        q_buf = None if fp32 else torch.empty(t_step * v_step, dtype=torch.float32, device=device)
        acc_buf = None if fp32 or not want_w else torch.empty(v_step, width, dtype=torch.float32, device=device)
        for v0 in range(0, vocab_local, v_step):
            v1 = min(vocab_local, v0 + v_step)
            w_VH = weight[v0:v1]
            acc_w = None
            if want_w:
                acc_w = grad_w[v0:v1] if fp32 else acc_buf[: v1 - v0].zero_()
            if onehot_N is not None:
                in_block_N = (col_N1.squeeze(-1) >= v0) & (col_N1.squeeze(-1) < v1)
                block_col_N1 = (col_N1 - v0).clamp_(0, v1 - v0 - 1)
                block_onehot_N1 = (onehot_N * in_block_N).unsqueeze(-1)
            for t0 in range(0, rows, t_step):
                t1 = min(rows, t0 + t_step)
                shape = (t1 - t0, v1 - v0)
                n = shape[0] * shape[1]
                h_CH = h_NH[t0:t1]
                z_CV = torch.mm(h_CH, w_VH.t(), out=z_buf[:n].view(shape))
                g_CV = z_CV if fp32 else q_buf[:n].view(shape)
                chunk_grad(z_CV, p_buf[:n].view(shape), g_CV, neg_lse_N1[t0:t1],
                           a_N1[t0:t1] if a_N1 is not None else None, b_N1[t0:t1], inv_t)
                if onehot_N is not None:
                    g_CV.scatter_add_(-1, block_col_N1[t0:t1], block_onehot_N1[t0:t1])
                if fp32:
                    if want_h:
                        grad_h[t0:t1].addmm_(g_CV, w_VH)
                    if want_w:
                        acc_w.addmm_(g_CV.t(), h_CH)
                else:
                    g_CV = z_CV.copy_(g_CV)  # the GEMMs run in the inputs' dtype
                    if want_h:
                        grad_h[t0:t1] += torch.mm(g_CV, w_VH)
                    if want_w:
                        acc_w += torch.mm(g_CV.t(), h_CH)
            if want_w and not fp32:
                grad_w[v0:v1].copy_(acc_w)
        if want_h:
            grad_h = grad_h.view(hidden.shape) if fp32 else grad_h.to(dtype).view(hidden.shape)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_vocab_parallel_log_probs(hidden, weight, targets, *, tp_group=None, temperature=1.0, with_entropy=False,
                                   chunk_size=None):
    """Log-probabilities of ``targets`` (and optionally the entropy) under
    softmax(hidden @ weight^T / temperature), without materialising the logits.

    hidden [tokens, H] or [S, B, H] (any leading dims), weight [V/TP, H] this rank's contiguous
    vocab shard (same dtype and device), targets [...] = hidden.shape[:-1] global token ids.
    Returns log_probs [...] float32 (and entropy [...] float32 if with_entropy, as a tuple).
    Both are differentiable wrt ``hidden`` and ``weight``; under TP the gradient of ``hidden``
    is this shard's part of the sum over the vocab (see the module docstring: the caller
    reduces it over the TP group, as Megatron's ColumnParallelLinear does).

    tp_group: the tensor-parallel group, or None without tensor parallelism. chunk_size: tokens
    per forward chunk (the backward's blocks hold as many elements); None: forward chunks of
    ~256 MB and backward blocks of ~64 MB of float32.
    """
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {type(value).__name__} "
                             f"{getattr(value, 'dtype', '')}")
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden [..., H] and weight [V/TP, H] must share H, got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocab dim: shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden and weight must share dtype and device, got {hidden.dtype} on {hidden.device} "
                         f"and {weight.dtype} on {weight.device}")
    check_targets(targets, hidden.shape[:-1], "hidden.shape[:-1]")
    check_options(temperature, chunk_size, "tokens")
    check_target_range(targets, weight.shape[0], tp_group)
    vocab_local = weight.shape[0]
    if chunk_size is not None:
        rows_per_chunk, elems = chunk_size, chunk_size * vocab_local
    else:
        rows_per_chunk, elems = max(1, _FORWARD_CHUNK_BYTES // (4 * vocab_local)), DEFAULT_CHUNK_BYTES // 4
    return _FusedLogProbs.apply(hidden, weight, targets.long(), tp_group, float(temperature), with_entropy,
                                rows_per_chunk, elems)
