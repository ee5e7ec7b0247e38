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

__all__ = ["vocab_parallel_log_probs"]

# Default float32 workspace per chunk, in bytes (see the module docstring).
_DEFAULT_CHUNK_BYTES = 64 * 2**20


def _rows_per_chunk(chunk_size: int | None, vocab_local: int) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, _DEFAULT_CHUNK_BYTES // (4 * vocab_local))


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
        col_N1, here_N = _local_targets(targets.reshape(-1), rank * vocab_local, vocab_local)
        inv_t = 1.0 / temperature

        # Per-row local statistics, relative to the local row max of the raw logits.
        max_N = torch.empty(rows, dtype=torch.float32, device=logits.device)
        stats_KN = torch.empty(3 if with_entropy else 2, rows, dtype=torch.float32, device=logits.device)
        sumexp_N, target_N = stats_KN[0], stats_KN[1]
        work = torch.empty(min(rows_per_chunk, rows) * vocab_local, dtype=torch.float32, device=logits.device)
        for lo, x_CV in (_row_chunks(logits, split, rows_per_chunk) if rows else ()):
            hi = lo + x_CV.shape[0]
            e_CV = work[: (hi - lo) * vocab_local].view(hi - lo, vocab_local)
            m_C1 = x_CV.amax(-1, keepdim=True).float()
            max_N[lo:hi] = m_C1.squeeze(-1)
            torch.add(m_C1.mul(-inv_t), x_CV, alpha=inv_t, out=e_CV)  # (x - m) / T, fp32
            e_CV.exp_()
            torch.sum(e_CV, -1, out=sumexp_N[lo:hi])
            if with_entropy:
                torch.sum(e_CV.mul_(x_CV), -1, out=stats_KN[2, lo:hi])  # sum exp * x
            target_N[lo:hi] = x_CV.gather(-1, col_N1[lo:hi]).squeeze(-1).float()
        del work
        target_N.mul_(here_N)

        if tp_group is not None:
            local_max_N = max_N.clone()
            dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=tp_group)
            rescale_N = torch.sub(local_max_N, max_N).mul_(inv_t).exp_()
            stats_KN[0].mul_(rescale_N)
            if with_entropy:
                stats_KN[2].mul_(rescale_N)
            dist.all_reduce(stats_KN, op=dist.ReduceOp.SUM, group=tp_group)

        lse_N = sumexp_N.log().add_(max_N, alpha=inv_t)
        logp_N = target_N.mul(inv_t).sub_(lse_N)
        outputs = [logp_N.view(targets.shape)]
        mean_z_N = None
        if with_entropy:
            mean_z_N = stats_KN[2].div(sumexp_N).mul_(inv_t)  # E_p[z]
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

        # d/dx_j = ( g_lp * onehot_j - p_j * (g_lp + g_H * (z_j - E)) ) / T
        #        = onehot_j * g_lp / T + p_j * (b + a * x_j),  a = -g_H / T^2, b = -(g_lp - g_H E) / T
        g_lp_N = grad_logp.reshape(-1).float() if grad_logp is not None else None
        g_h_N = grad_ent.reshape(-1).float() if grad_ent is not None else None
        b_N1 = torch.zeros(rows, dtype=torch.float32, device=device) if g_lp_N is None else -inv_t * g_lp_N
        a_N1 = None
        if g_h_N is not None:
            b_N1 = b_N1 + (inv_t * g_h_N) * mean_z_N
            a_N1 = (-inv_t * inv_t * g_h_N).unsqueeze(-1)
        b_N1 = b_N1.unsqueeze(-1)
        if g_lp_N is not None:
            col_N1, here_N = _local_targets(targets.reshape(-1), ctx.rank * vocab_local, vocab_local)
            onehot_N1 = (g_lp_N * inv_t).mul_(here_N).unsqueeze(-1)
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
            torch.add(neg_lse_N1[lo:hi], x_CV, alpha=inv_t, out=p_CV)
            p_CV.exp_()
            if a_N1 is None:
                torch.mul(p_CV, b_N1[lo:hi], out=w_CV)
            else:
                torch.addcmul(b_N1[lo:hi], x_CV, a_N1[lo:hi], out=w_CV)
                w_CV.mul_(p_CV)
            if g_lp_N is not None:
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
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    vocab = logits.shape[-1] * tp_size
    if targets.numel() > 0:
        lo, hi = torch.aminmax(targets)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets contains token id {bad}, expected ids in [0, {vocab}) "
                             f"(global vocab = local vocab {logits.shape[-1]} x TP size {tp_size})")
    rows_per_chunk = _rows_per_chunk(chunk_size, logits.shape[-1])
    return _VocabParallelLogProbs.apply(logits, targets.long(), tp_group, float(temperature), with_entropy,
                                        rows_per_chunk)
