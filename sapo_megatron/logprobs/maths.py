"""The maths both log-prob paths share: per-chunk softmax statistics, their combination over
vocab shards, the closed-form gradient of a chunk, and the input checks.

:mod:`.vocab_parallel` feeds these chunks of logits the model already produced; :mod:`.fused`
feeds them chunks it computes from the hidden states and the output weight. Plain tensors in,
plain tensors out; the only communication is in :func:`combine_stats` (two all-reduces).

Notation: x = raw logits, z = x / T, rows = flattened leading dims. Per row the forward keeps
the LOCAL max m, sum exp((x - m) / T), the target logit (0 where this shard does not hold the
target) and, for the entropy, sum exp((x - m) / T) * x.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Default float32 workspace per chunk, in bytes (see .vocab_parallel's docstring).
DEFAULT_CHUNK_BYTES = 64 * 2**20


def local_targets(targets_N: torch.Tensor, vocab_start: int, vocab_local: int):
    """Column of each target within this shard (clamped into range) and whether it is here."""
    local_N = targets_N - vocab_start
    here_N = (local_N >= 0) & (local_N < vocab_local)
    return local_N.clamp_(0, max(vocab_local - 1, 0)).unsqueeze(-1), here_N


def new_stats(rows: int, with_entropy: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty per-row statistics: the local max [rows] and [sumexp, target, (sum exp*x)] [K, rows]."""
    max_N = torch.empty(rows, dtype=torch.float32, device=device)
    stats_KN = torch.empty(3 if with_entropy else 2, rows, dtype=torch.float32, device=device)
    return max_N, stats_KN


def chunk_stats(x_CV, e_CV, col_C1, inv_t: float, max_C, stats_KC) -> None:
    """Fill one chunk's rows of the statistics from its logits ``x_CV`` (any float dtype).

    ``e_CV`` is a float32 workspace of the same shape; ``max_C`` and ``stats_KC`` are the
    chunk's rows of :func:`new_stats`' tensors (views, written in place).
    """
    m_C1 = x_CV.amax(-1, keepdim=True).float()
    max_C.copy_(m_C1.squeeze(-1))
    torch.add(m_C1.mul(-inv_t), x_CV, alpha=inv_t, out=e_CV)  # (x - m) / T, fp32
    e_CV.exp_()
    torch.sum(e_CV, -1, out=stats_KC[0])
    if stats_KC.shape[0] == 3:
        torch.sum(e_CV.mul_(x_CV), -1, out=stats_KC[2])  # sum exp * x
    stats_KC[1].copy_(x_CV.gather(-1, col_C1).squeeze(-1))


def combine_stats(max_N, stats_KN, here_N, inv_t: float, tp_group):
    """Global (lse, target log-prob, E_p[z] or None) per row from every shard's statistics.

    The two all-reduces of a call: MAX of the local maxima, then SUM of the rescaled
    [sumexp, target, (sum exp*x)] stack (only the owning rank's target logit is non-zero).
    """
    with_entropy = stats_KN.shape[0] == 3
    stats_KN[1].mul_(here_N)
    if tp_group is not None:
        local_max_N = max_N.clone()
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=tp_group)
        rescale_N = torch.sub(local_max_N, max_N).mul_(inv_t).exp_()
        stats_KN[0].mul_(rescale_N)
        if with_entropy:
            stats_KN[2].mul_(rescale_N)
        dist.all_reduce(stats_KN, op=dist.ReduceOp.SUM, group=tp_group)
    sumexp_N = stats_KN[0]
    lse_N = sumexp_N.log().add_(max_N, alpha=inv_t)
    logp_N = stats_KN[1].mul(inv_t).sub_(lse_N)
    mean_z_N = stats_KN[2].div(sumexp_N).mul_(inv_t) if with_entropy else None
    return lse_N, logp_N, mean_z_N


def grad_coefficients(grad_logp, grad_ent, mean_z_N, inv_t: float, rows: int, device):
    """Per-row coefficients of the logits gradient.

    d/dx_j = ( g_lp * onehot_j - p_j * (g_lp + g_H * (z_j - E)) ) / T
           = onehot_j * g_lp / T + p_j * (b + a * x_j),  a = -g_H / T^2, b = -(g_lp - g_H E) / T

    Returns (a [rows, 1] or None without an entropy gradient, b [rows, 1], the one-hot weight
    g_lp / T [rows] or None without a log-prob gradient).
    """
    g_lp_N = grad_logp.reshape(-1).float() if grad_logp is not None else None
    g_h_N = grad_ent.reshape(-1).float() if grad_ent is not None else None
    b_N = torch.zeros(rows, dtype=torch.float32, device=device) if g_lp_N is None else -inv_t * g_lp_N
    a_N1 = None
    if g_h_N is not None:
        b_N = b_N + (inv_t * g_h_N) * mean_z_N
        a_N1 = (-inv_t * inv_t * g_h_N).unsqueeze(-1)
    onehot_N = g_lp_N * inv_t if g_lp_N is not None else None
    return a_N1, b_N.unsqueeze(-1), onehot_N


def chunk_grad(x_CV, p_CV, w_CV, neg_lse_C1, a_C1, b_C1, inv_t: float) -> None:
    """The softmax part of one chunk's logits gradient, ``p * (b + a x)``, into ``w_CV``.

    ``p_CV`` (float32) is a workspace; ``w_CV`` may be float32 or the chunk's own gradient
    buffer when that is float32. The one-hot part is added by the caller, which knows where
    this chunk's columns sit in the vocab.
    """
    torch.add(neg_lse_C1, x_CV, alpha=inv_t, out=p_CV)
    p_CV.exp_()
    if a_C1 is None:
        torch.mul(p_CV, b_C1, out=w_CV)
    else:
        torch.addcmul(b_C1, x_CV, a_C1, out=w_CV)
        w_CV.mul_(p_CV)


def check_targets(targets, expected_shape, what: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {what} = {tuple(expected_shape)}")


def check_options(temperature, chunk_size, chunk_unit: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int ({chunk_unit} per chunk) or None, got {chunk_size!r}")


def check_target_range(targets, vocab_local: int, tp_group) -> None:
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    vocab = vocab_local * tp_size
    if targets.numel() > 0:
        lo, hi = torch.aminmax(targets)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets contains token id {bad}, expected ids in [0, {vocab}) "
                             f"(global vocab = local vocab {vocab_local} x TP size {tp_size})")
