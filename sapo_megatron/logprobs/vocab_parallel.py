"""Token log-probabilities (and entropy) from vocab-parallel logits, chunked, with a hand-written backward.

The policy head of a Megatron-Core model under tensor parallelism (TP) leaves each rank with a
contiguous vocab shard of the logits: rank r holds token ids [r*V/TP, (r+1)*V/TP). RL losses
need, per token, log pi(target) and often the policy entropy. This module computes both
without ever gathering the full vocab and without a float32 copy of the logits.

Design choices
--------------
* A custom ``torch.autograd.Function`` with a hand-written backward. A log-softmax written with
  plain ``dist.all_reduce`` inside autograd gives the right values and wrong gradients at
  TP >= 2 (``dist.all_reduce`` is invisible to autograd, so each rank differentiates its local
  graph as if the all-reduced sums were local functions of its shard). Here the gradient is
  closed-form and local:
  for z = logits / T, d logp / dz_j = onehot_j - p_j and d H / dz_j = -p_j (z_j - E_p[z]),
  where p, lse and E_p[z] are over the FULL vocab. The forward saves the global lse and E_p[z]
  per row, so the backward needs no communication at all.
* Two all-reduces per call, whatever the chunking: the forward first walks all chunks computing
  per-row LOCAL statistics relative to the local max m_r (sum exp, sum exp*x, target logit),
  then one MAX all-reduce gives the global max M, each rank rescales its sums by
  exp((m_r - M)/T), and one SUM all-reduce of a stacked [3, rows] tensor combines the sums and
  the target logit (only the owning rank contributes a non-zero target logit).
* Chunking over rows (the flattened leading dims). Each chunk is upcast to float32 into ONE
  reusable workspace of [chunk, V/TP]; all the work is fused/in-place on it (``torch.add(...,
  out=)``, ``exp_``, ``addcmul``), so the extra memory is one float32 chunk plus O(rows) stats.
  Backward saves only a reference to the logits plus lse and E_p[z] per row ([rows] each) and
  recomputes the softmax chunk by chunk, writing the logits gradient in place chunk by chunk.
  Rows are taken as views whatever the strides of the leading dims (a transposed [S, B, V] or
  a [:, :-1] slice is walked block by block, never flattened by a copying ``reshape``).
  For float32 logits the gradient tensor itself serves as the second operand buffer; for
  bf16/fp16 logits the workspace is split into two half-chunk float32 buffers, so the bound of
  one float32 chunk holds for every dtype.
* Default chunk (``chunk_size=None``): about 64 MB of float32 (at least one row), on every
  device. Per chunk the work is 5-6 in-place passes over the workspace; 64 MB keeps the extra
  memory a few percent of the logits of a real batch while each op is large enough that
  per-op overhead (kernel launches on GPU, OpenMP fork/join on CPU, which becomes very costly
  when other processes compete for the cores) stays negligible. Cache-sized chunks (~4 MB)
  were ~15% faster on an idle 2-core CPU and up to 3x slower on a busy one
  (docs/performance.md).
* Gradient accounting for temperature: everything is computed on z = logits / T, and the
  returned logits gradient carries the extra 1/T.
* Logits must be finite (a -inf entry makes the entropy sum 0 * inf = nan, as in the naive
  formula). Megatron's padded vocab entries are ordinary finite logits.

Run it
------
Single process (no tensor parallelism)::

    from sapo_megatron.logprobs import vocab_parallel_log_probs
    logp_BS, ent_BS = vocab_parallel_log_probs(logits_BSV, tokens_BS, temperature=0.7,
                                               with_entropy=True)

Under torchrun, pass the TP group (``parallel_state.get_tensor_model_parallel_group()``) and
this rank's logits shard; the tests do this on 2 and 4 gloo ranks
(``pytest tests/test_logprobs.py``, which launches ``torchrun --nproc_per_node=4 --standalone
tests/dist/logprobs_worker.py --out DIR``). Benchmark: ``python benchmarks/bench_logprobs.py``
(``--vocab 32000 --tokens 256`` for a quick run).
"""

from __future__ import annotations

import itertools
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

__all__ = ["vocab_parallel_log_probs"]


def _rows_per_chunk(chunk_size: int | None, vocab_local: int) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_local))


def _row_split(x: torch.Tensor) -> int:
    """Number of outer leading dims to loop over so that each x[outer] views as [rows, vocab].

    0 for contiguous logits; 1 for e.g. ``logits_SBV.transpose(0, 1)`` or ``logits_BSV[:, :-1]``,
    which reshape could only flatten by copying the whole tensor.
    """
    lead = x.dim() - 1
    for split in range(lead):
        try:
            x[(0,) * split].view(-1, x.shape[-1])
            return split
        except RuntimeError:
            continue
    return lead


def _row_chunks(x: torch.Tensor, split: int, rows_per_chunk: int):
    """(first row, view [rows, vocab]) per chunk, rows in row-major order of x's leading dims."""
    outer = x.shape[:split]
    inner_rows = math.prod(x.shape[split:-1])
    for i, index in enumerate(itertools.product(*(range(n) for n in outer))):
        block = x[index].view(inner_rows, x.shape[-1])
        for lo in range(0, inner_rows, rows_per_chunk):
            yield i * inner_rows + lo, block[lo:lo + rows_per_chunk]


def _local_targets(targets_N: torch.Tensor, vocab_start: int, vocab_local: int):
    """Column of each target within this shard (clamped into range) and whether it is here."""
    local_N = targets_N - vocab_start
    here_N = (local_N >= 0) & (local_N < vocab_local)
    return local_N.clamp_(0, max(vocab_local - 1, 0)).unsqueeze(-1), here_N


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, temperature, with_entropy, rows_per_chunk):
        vocab_local = logits.shape[-1]
        rows = targets.numel()
        split = _row_split(logits) if rows else 0
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        col_N1, here_N = local_targets(targets.reshape(-1), rank * vocab_local, vocab_local)
        inv_t = 1.0 / temperature

        # Per-row local statistics, relative to the local row max of the raw logits.
        max_N, stats_KN = new_stats(rows, with_entropy, logits.device)
        work = torch.empty(min(rows_per_chunk, rows) * vocab_local, dtype=torch.float32, device=logits.device)
        for lo, x_CV in (_row_chunks(logits, split, rows_per_chunk) if rows else ()):
            hi = lo + x_CV.shape[0]
            e_CV = work[: (hi - lo) * vocab_local].view(hi - lo, vocab_local)
            chunk_stats(x_CV, e_CV, col_N1[lo:hi], inv_t, max_N[lo:hi], stats_KN[:, lo:hi])
        del work
        lse_N, logp_N, mean_z_N = combine_stats(max_N, stats_KN, here_N, inv_t, tp_group)

        outputs = [logp_N.view(targets.shape)]
        if with_entropy:
            outputs.append(lse_N.sub(mean_z_N).view(targets.shape))
            ctx.save_for_backward(logits, targets, lse_N, mean_z_N)
        else:
            ctx.save_for_backward(logits, targets, lse_N)
        ctx.set_materialize_grads(False)
        ctx.rank, ctx.temperature, ctx.rows_per_chunk, ctx.split = rank, temperature, rows_per_chunk, split
        return tuple(outputs) if with_entropy else outputs[0]

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, targets, lse_N, *rest = ctx.saved_tensors
        mean_z_N = rest[0] if rest else None
        if grad_logp is None and grad_ent is None:
            return (None,) * 6
        vocab_local = logits.shape[-1]
        rows = targets.numel()
        inv_t = 1.0 / ctx.temperature
        rows_per_chunk = ctx.rows_per_chunk
        device = logits.device

        a_N1, b_N1, onehot_N = grad_coefficients(grad_logp, grad_ent, mean_z_N, inv_t, rows, device)
        if onehot_N is not None:
            col_N1, here_N = local_targets(targets.reshape(-1), ctx.rank * vocab_local, vocab_local)
            onehot_N1 = onehot_N.mul_(here_N).unsqueeze(-1)
        neg_lse_N1 = lse_N.neg().unsqueeze(-1)

        # Same strides as the logits where they are dense, so the same row split views it.
        grad = torch.empty_like(logits)
        fp32_grad = logits.dtype == torch.float32
        # float32 logits: the gradient chunk is the second fp32 operand; otherwise split the
        # workspace into two half chunks so the float32 footprint stays one chunk.
        step = rows_per_chunk if fp32_grad else max(1, rows_per_chunk // 2)
        n_buf = 1 if fp32_grad else 2
        work = torch.empty(n_buf * min(step, rows) * vocab_local, dtype=torch.float32, device=device)
        half = min(step, rows) * vocab_local
        chunks = zip(_row_chunks(logits, ctx.split, step), _row_chunks(grad, ctx.split, step)) if rows else ()
        for (lo, x_CV), (_, grad_CV) in chunks:
            hi = lo + x_CV.shape[0]
            n = (hi - lo) * vocab_local
            p_CV = work[:n].view(hi - lo, vocab_local)
            w_CV = grad_CV if fp32_grad else work[half:half + n].view(hi - lo, vocab_local)
            a_C1 = a_N1[lo:hi] if a_N1 is not None else None
            chunk_grad(x_CV, p_CV, w_CV, neg_lse_N1[lo:hi], a_C1, b_N1[lo:hi], inv_t)
            if onehot_N is not None:
                w_CV.scatter_add_(-1, col_N1[lo:hi], onehot_N1[lo:hi])
            if not fp32_grad:
                grad_CV.copy_(w_CV)
        return grad, None, None, None, None, None


def vocab_parallel_log_probs(logits, targets, *, tp_group=None, temperature=1.0, with_entropy=False, chunk_size=None):
    """Log-probabilities of ``targets`` (and optionally the entropy) under softmax(logits / temperature).

    logits [..., vocab/TP] (this rank's contiguous vocab shard, rank r holds ids
    [r*V/TP, (r+1)*V/TP)), targets [...] global token ids (long).
    Returns log_probs [...] float32 (and entropy [...] float32 if with_entropy, as a tuple
    (log_probs, entropy)). Both outputs are differentiable wrt ``logits``.

    tp_group: the tensor-parallel process group, or None for no tensor parallelism (no
    torch.distributed needed). chunk_size: rows (over the flattened leading dims) per float32
    chunk; None picks ~64 MB chunks. The leading dims may have
    any strides (e.g. ``logits_SBV.transpose(0, 1)`` or ``logits_BSV[:, :-1]``): the logits
    are never copied, and their gradient has their strides where they are dense.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [..., vocab/TP], got {type(logits).__name__} "
                         f"{getattr(logits, 'dtype', '')} {tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has an empty vocab dim: shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[:-1], "logits.shape[:-1]")
    check_options(temperature, chunk_size, "rows")
    check_target_range(targets, logits.shape[-1], tp_group)
    rows_per_chunk = _rows_per_chunk(chunk_size, logits.shape[-1])
    return _VocabParallelLogProbs.apply(logits, targets.long(), tp_group, float(temperature), with_entropy,
                                        rows_per_chunk)
