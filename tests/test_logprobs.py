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

from sapo_megatron.logprobs import vocab_parallel_log_probs
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
