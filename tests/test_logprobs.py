"""vocab_parallel_log_probs against a float64 full-vocab reference: values AND gradients.

TP=1 runs in this process; TP=2 and TP=4 run for real on 4 gloo ranks under torchrun
(tests/dist/logprobs_worker.py), each rank holding its contiguous vocab shard, and every rank's
local gradient is compared with its slice of the reference gradient.

Tolerances (used by ``_check``):
* float32 logits: the kernel works in float32; the reference in float64. Values are sums of
  <= 48 terms of magnitude <= ~20 (logits ~3 sigma / T=0.7, lse), so float32 rounding moves
  them by <~ 20 * 48 * 6e-8 ~ 6e-5 in the very worst case and ~1e-6 in practice; gradients
  are O(1). atol=rtol=2e-5 is far above that noise and far below any real bug (a shard
  missing from the normaliser, a wrong temperature factor, a gradient without the
  cross-shard terms all move results by >= 1e-2).
* bf16 logits: the reference is computed from the SAME bf16-rounded logits, so values (float32
  outputs, computed in float32) keep the float32 tolerance. The logits gradient is returned in
  bf16 (same dtype as the logits), rounded once from float32: relative error <= 2^-9 ~ 2e-3
  per element, so rtol=4e-3 (twice the rounding bound) plus a small atol for elements near 0.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from sapo_megatron.logprobs import fused_vocab_parallel_log_probs, vocab_parallel_log_probs
from tests.dist import logprobs_worker as worker
from tests.launch import torchrun

WORKER_PATH = Path(worker.__file__)

VALUE_TOL = dict(rtol=2e-5, atol=2e-5)  # float32 arithmetic vs float64, see module docstring
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),  # float32 arithmetic, see module docstring
    torch.bfloat16: dict(rtol=4e-3, atol=1e-5),  # one bf16 rounding of the float32 gradient
    torch.float16: dict(rtol=1e-3, atol=1e-5),  # one fp16 rounding (2^-11 ~ 5e-4 relative)
}


def reference(logits, targets, g_logp, g_ent, *, mode, temperature):
    """float64 full-vocab log-probs, entropy and d loss / d logits for the loss of ``mode``."""
    x = logits.detach().double().requires_grad_()
    logp_NV = torch.log_softmax(x / temperature, -1)
    logp = logp_NV.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_NV.exp() * logp_NV).sum(-1)
    loss = {"logp": (logp * g_logp.double()).sum(), "ent": (ent * g_ent.double()).sum(),
            "both": (logp * g_logp.double() + ent * g_ent.double()).sum(),
            "logp_of_pair": (logp * g_logp.double()).sum()}[mode]
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), ent.detach(), grad


def _check(got, ref, dtype, *, shard=slice(None)):
    logp, ent, grad = got
    ref_logp, ref_ent, ref_grad = ref
    torch.testing.assert_close(logp.double(), ref_logp, **VALUE_TOL)  # tolerance: module docstring
    if ent is not None:
        torch.testing.assert_close(ent.double(), ref_ent, **VALUE_TOL)  # tolerance: module docstring
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad[..., shard], **GRAD_TOL[dtype])  # per-dtype reason: GRAD_TOL


@pytest.mark.parametrize("dtype,temperature,chunk,mode", list(itertools.product(
    (torch.float32, torch.bfloat16, torch.float16), worker.TEMPERATURES, (None, 4, 1, 100), worker.MODES)))
def test_single_rank_matches_float64_reference(dtype, temperature, chunk, mode):
    logits, targets, g_logp, g_ent = worker.make_inputs(7, dtype)
    got = worker.run_case(logits, targets, g_logp, g_ent, mode=mode, temperature=temperature, chunk_size=chunk,
                          tp_group=None)
    assert got[0].dtype == torch.float32 and got[0].shape == targets.shape
    _check(got, reference(logits, targets, g_logp, g_ent, mode=mode, temperature=temperature), dtype)


def test_large_logits_are_stable():
    # Logits far from 0 (a shift of 1e4 is invisible to softmax): the row-max shift must hold.
    logits, targets, g_logp, g_ent = worker.make_inputs(3, torch.float32)
    shifted = logits.double() + 1e4
    logp, ent, _ = worker.run_case(shifted.float(), targets, g_logp, g_ent, mode="both", temperature=0.5,
                                   chunk_size=None, tp_group=None)
    ref_logp, ref_ent, _ = reference(shifted.float(), targets, g_logp, g_ent, mode="both", temperature=0.5)
    # 1e4 in float32 has ulp ~1e-3 and entropy subtracts two ~2e4 numbers (lse - E_p[z]), so
    # absolute errors up to a few 1e-3 are float32 representation, not a bug.
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-2)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-2)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_logprobs")
    torchrun(WORKER_PATH, "--out", out, nproc=4, timeout=300)
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_float64_reference(dist_results, tp):
    width = worker.VOCAB // tp
    for rank, results in enumerate(dist_results):
        shard_rank = rank % tp  # TP=2 groups are {0,1} and {2,3}
        shard = slice(shard_rank * width, (shard_rank + 1) * width)
        for i, (dtype, temperature, _chunk, mode) in enumerate(worker.CASES):
            logits, targets, g_logp, g_ent = worker.make_inputs(i, dtype)
            ref = reference(logits, targets, g_logp, g_ent, mode=mode, temperature=temperature)
            _check(results[(tp, i)], ref, dtype, shard=shard)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_rejects_target_beyond_global_vocab(dist_results, tp):
    for results in dist_results:
        message = results[(tp, "error")]
        assert message is not None and "targets" in message and f"[0, {worker.VOCAB})" in message


def test_chunked_path_saves_only_the_logits_reference():
    rows, vocab = 64, 512
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(4, rows // 4, vocab).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (4, rows // 4))
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, ent = vocab_parallel_log_probs(logits, targets, with_entropy=True, chunk_size=8)
        large = [t for t in saved if t.numel() >= rows * vocab]
        assert len(large) == 1, [(tuple(t.shape), t.dtype) for t in saved]
        # A reference to the input's storage, not a copy (and not a float32 upcast).
        assert large[0].data_ptr() == logits.data_ptr() and large[0].dtype == dtype
        assert all(t.numel() <= rows for t in saved if t is not large[0])
        (logp.sum() + ent.sum()).backward()
        assert logits.grad.shape == logits.shape and logits.grad.dtype == dtype


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_leading_dims_match_reference_without_copy(layout):
    # Megatron's logits are [S, B, V]; callers transpose them or drop the last position.
    full, targets, g_logp, g_ent = worker.make_inputs(9, torch.float32)
    if layout == "transposed":
        logits = full.transpose(0, 1).contiguous().transpose(0, 1)  # [B, S, V] view of an [S, B, V] buffer
    else:
        logits = full[:, :-1]
        targets, g_logp, g_ent = targets[:, :-1], g_logp[:, :-1], g_ent[:, :-1]
    assert not logits.is_contiguous()
    x = logits.detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, ent = vocab_parallel_log_probs(x, targets, temperature=0.7, with_entropy=True, chunk_size=2)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # the logits themselves, not a copy
    (logp * g_logp + ent * g_ent).sum().backward()
    if layout == "transposed":
        assert x.grad.stride() == x.stride()  # gradient in the logits' own layout: no copy into .grad
    _check((logp, ent, x.grad), reference(logits, targets, g_logp, g_ent, mode="both", temperature=0.7),
           torch.float32)


@pytest.mark.slow
def test_default_chunking_matches_single_chunk():
    # vocab 2**21: the ~64 MB default chunk is 8 rows, so the 15 rows span two chunks.
    logits, targets, g_logp, g_ent = worker.make_inputs(5, torch.float32, vocab=2**21)
    big = worker.run_case(logits, targets, g_logp, g_ent, mode="both", temperature=1.3, chunk_size=10**6,
                          tp_group=None)
    default = worker.run_case(logits, targets, g_logp, g_ent, mode="both", temperature=1.3, chunk_size=None,
                              tp_group=None)
    for a, b in zip(big, default):
        # Same float32 arithmetic per row; only the chunk boundaries differ.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_empty_input():
    logits = torch.randn(0, 7, 16, requires_grad=True)
    logp, ent = vocab_parallel_log_probs(logits, torch.zeros(0, 7, dtype=torch.long), with_entropy=True)
    assert logp.shape == ent.shape == (0, 7)
    (logp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("kwargs,targets,name", [
    ({}, torch.zeros(2, 4, dtype=torch.long), "targets has shape"),
    ({}, torch.zeros(2, 3), "targets must be an integer tensor"),
    ({}, torch.full((2, 3), 16), "targets contains token id 16, expected ids in [0, 16)"),
    ({}, torch.full((2, 3), -1), "targets contains token id -1, expected ids in [0, 16)"),
    ({"temperature": 0.0}, torch.zeros(2, 3, dtype=torch.long), "temperature"),
    ({"temperature": -1.0}, torch.zeros(2, 3, dtype=torch.long), "temperature"),
    ({"chunk_size": 0}, torch.zeros(2, 3, dtype=torch.long), "chunk_size"),
    ({"chunk_size": 2.5}, torch.zeros(2, 3, dtype=torch.long), "chunk_size"),
    ({"chunk_size": -3}, torch.zeros(2, 3, dtype=torch.long), "chunk_size"),
])
def test_bad_inputs_raise_value_error_naming_the_input(kwargs, targets, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        vocab_parallel_log_probs(torch.randn(2, 3, 16), targets, **kwargs)


def test_integer_logits_rejected():
    with pytest.raises(ValueError, match="logits"):
        vocab_parallel_log_probs(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, dtype=torch.long))


# --- fused_vocab_parallel_log_probs: from hidden states and the output weight ------------------
#
# Reference: float64 log-softmax of hidden64 @ weight64^T from the SAME (possibly bf16-rounded)
# inputs; gradients wrt hidden (summed over TP shards) and weight (each rank's shard).
# Tolerances:
# * float32: logits are H=8-term dot products (|x| <~ 10) computed in float32, then the same
#   float32 statistics as above: errors ~1e-6; VALUE_TOL / GRAD_TOL's 2e-5 hold with room. The
#   hidden gradient sums V=48 terms (grad_x_j * w_j): still ~1e-6.
# * bf16: the fused path's logits block is bf16, as the output layer's would be: each logit is
#   rounded once (|error| <= |x| 2^-9), so log-prob and entropy move by at most
#   2 max|x| 2^-9 / T (the target logit and the lse each shift by <= max|x| 2^-9 / T): the bound
#   is computed from the data below, times 1.5. The gradients are formed in float32, rounded to
#   bf16 once for each GEMM and once at the end: a few 2^-9 relative per element, so they are
#   compared in norm, ||got - ref|| / ||ref|| <= 3e-2 (~8x the 2^-9 bound times 2 roundings,
#   since GEMM sums of rounded terms do not cancel errors exactly). A missing shard, a missing
#   1/T or a wrong sign moves these by >= 0.1 (the guard test below measures one).

FUSED_GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def fused_reference(hidden, weight, targets, g_logp, g_ent, *, mode, temperature):
    """float64 log-probs, entropy, d loss / d hidden and d loss / d weight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_NV = torch.log_softmax(h @ w.T / temperature, -1)
    logp = logp_NV.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_NV.exp() * logp_NV).sum(-1)
    loss = (logp * g_logp.double()).sum() + ((ent * g_ent.double()).sum() if mode == "both" else 0)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return logp.detach(), ent.detach(), grad_h, grad_w


def _value_tol(hidden, weight, dtype, temperature):
    if dtype == torch.float32:
        return VALUE_TOL
    bound = 2 * float((hidden.double() @ weight.double().T).abs().max()) * 2.0**-9 / temperature
    return dict(rtol=0, atol=1.5 * bound)  # one bf16 rounding per logit, see the comment above


def _rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


def _check_fused(got_logp, got_ent, grad_h, grad_w, ref, dtype, tol, *, shard=slice(None)):
    ref_logp, ref_ent, ref_h, ref_w = ref
    torch.testing.assert_close(got_logp.double(), ref_logp, **tol)  # tolerance: _value_tol
    if got_ent is not None:
        torch.testing.assert_close(got_ent.double(), ref_ent, **tol)  # tolerance: _value_tol
    assert grad_h.dtype == grad_w.dtype == dtype
    assert _rel(grad_h, ref_h) <= FUSED_GRAD_REL[dtype]  # tolerance: FUSED_GRAD_REL's comment
    assert _rel(grad_w, ref_w[shard]) <= FUSED_GRAD_REL[dtype]


@pytest.mark.parametrize("dtype,temperature,chunk,mode", list(itertools.product(
    worker.DTYPES, worker.TEMPERATURES, (None, 4, 1, 100), ("logp", "both"))))
def test_fused_single_rank_matches_float64_reference(dtype, temperature, chunk, mode):
    hidden, weight, targets, g_logp, g_ent = worker.make_fused_inputs(3, dtype)
    logp, ent, grad_h, grad_w = worker.run_fused_case(hidden, weight, targets, g_logp, g_ent, mode=mode,
                                                      temperature=temperature, chunk_size=chunk, tp_group=None)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert grad_h.shape == hidden.shape and grad_w.shape == weight.shape
    ref = fused_reference(hidden, weight, targets, g_logp, g_ent, mode=mode, temperature=temperature)
    _check_fused(logp, ent, grad_h, grad_w, ref, dtype, _value_tol(hidden, weight, dtype, temperature))


def test_fused_equals_unfused_path_in_float32():
    """Same numbers as the output layer's logits fed to vocab_parallel_log_probs (the trainer's
    fallback), including the gradients autograd takes through the matmul."""
    hidden, weight, targets, g_logp, g_ent = worker.make_fused_inputs(5, torch.float32)
    fused = worker.run_fused_case(hidden, weight, targets, g_logp, g_ent, mode="both", temperature=0.7,
                                  chunk_size=4, tp_group=None)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = vocab_parallel_log_probs(h @ w.T, targets, temperature=0.7, with_entropy=True)
    (logp * g_logp + ent * g_ent).sum().backward()
    for got, want in zip(fused, (logp.detach(), ent.detach(), h.grad, w.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 both, different sum orders


def test_fused_saves_only_its_inputs_and_per_token_statistics():
    tokens, vocab, width = 64, 512, 16
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, ent = fused_vocab_parallel_log_probs(hidden, weight, targets, with_entropy=True, chunk_size=8)
    # The inputs themselves (references) and per-token statistics; nothing of [tokens, vocab].
    inputs = {hidden.data_ptr(), weight.data_ptr()}
    assert all(t.data_ptr() in inputs or t.numel() <= tokens for t in saved), [tuple(t.shape) for t in saved]
    assert {t.data_ptr() for t in saved} >= inputs
    (logp.sum() + ent.sum()).backward()


def test_fused_backward_blocks_stay_within_one_forward_chunk():
    from sapo_megatron.logprobs.fused import block_shape

    for rows, vocab, elems in ((8192, 151936, 2**24), (15, 48, 4 * 48), (3, 10**6, 2**24), (10**6, 7, 70)):
        t, v = block_shape(rows, vocab, elems)
        assert 1 <= t <= rows and 1 <= v <= vocab and t * v <= max(elems, 1)
    assert block_shape(8192, 151936, 2**24) == (4096, 4096)  # near-square GEMMs at Qwen's vocab


def test_fused_frozen_weight_gets_no_gradient_work():
    hidden, weight, targets, g_logp, _ = worker.make_fused_inputs(1, torch.float32)
    h = hidden.clone().requires_grad_()
    logp = fused_vocab_parallel_log_probs(h, weight, targets)  # weight does not require grad
    (logp * g_logp).sum().backward()
    ref = fused_reference(hidden, weight, targets, g_logp, g_logp, mode="logp", temperature=1.0)
    assert weight.grad is None and _rel(h.grad, ref[2]) <= FUSED_GRAD_REL[torch.float32]


@pytest.mark.parametrize("args,name", [
    ((torch.randn(4, 8), torch.randn(16, 7), torch.zeros(4, dtype=torch.long)), "must share H"),
    ((torch.randn(4, 8), torch.randn(16, 8).double(), torch.zeros(4, dtype=torch.long)), "share dtype"),
    ((torch.randn(4, 8), torch.randn(16, 8), torch.zeros(5, dtype=torch.long)), "targets has shape"),
    ((torch.randn(4, 8), torch.randn(16, 8), torch.full((4,), 16)), r"token id 16, expected ids in \[0, 16\)"),
    ((torch.zeros(4, 8, dtype=torch.long), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)), "hidden must"),
    ((torch.randn(4, 8), torch.randn(0, 8), torch.zeros(4, dtype=torch.long)), "empty vocab"),
])
def test_fused_bad_inputs_name_the_input(args, name):
    with pytest.raises(ValueError, match=name):
        fused_vocab_parallel_log_probs(*args)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_fused_tensor_parallel_matches_float64_reference(dist_results, tp):
    width = worker.VOCAB // tp
    for i, (dtype, temperature, _chunk, mode) in enumerate(worker.FUSED_CASES):
        hidden, weight, targets, g_logp, g_ent = worker.make_fused_inputs(i, dtype)
        ref = fused_reference(hidden, weight, targets, g_logp, g_ent, mode=mode, temperature=temperature)
        tol = _value_tol(hidden, weight, dtype, temperature)
        for group_start in range(0, 4, tp):
            ranks = range(group_start, group_start + tp)
            # Megatron's input mapping all-reduces the hidden gradient over TP: sum the partials.
            grad_h = sum(dist_results[r][("fused", tp, i)][2].double() for r in ranks)
            for r in ranks:
                logp, ent, partial_h, grad_w = dist_results[r][("fused", tp, i)]
                shard = slice((r - group_start) * width, (r - group_start + 1) * width)
                _check_fused(logp, ent, grad_h.to(dtype), grad_w, ref, dtype, tol, shard=shard)
                # Guard: one shard's partial alone is far off, so the sum above is what passes.
                assert _rel(partial_h, ref[2]) > 10 * FUSED_GRAD_REL[dtype]
