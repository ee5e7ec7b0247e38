"""The delta codec's C kernels (``sapo_sglang.kernels``) against its numpy paths, bit for bit.

The numpy paths are the reference: ``np.flatnonzero`` of the bit patterns for the diff, the codec's
``gap_positions`` / ``encode_positions`` for the gap encoding, ``cumsum`` + scatter for applying
one. Lengths that are not a multiple of the kernels' four lanes, gaps longer than 255 (bridged),
a change at element 0 and at the last element, and all or no elements changed all occur. The
trainer's differ on real model slices is tests/test_delta_pieces.py (numpy and compiled files equal).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from sapo_megatron.rollout.sglang.weight_sync.delta_pieces import LocalPiece, PieceDiffer
from sapo_sglang import delta_loader as dl
from sapo_sglang import kernels

HAVE_CC = shutil.which((os.environ.get("CC") or "cc").split()[0]) is not None


@pytest.fixture(scope="module")
def k():
    if not HAVE_CC:
        pytest.skip("no C compiler on PATH: the kernels cannot be built here (the numpy paths are tested elsewhere)")
    found = kernels.delta_kernels()
    assert found is not None, "a C compiler is on PATH but the delta kernels did not build (see the warning)"
    return found


def _pair(n: int, frac: float, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    held = torch.randn(n, generator=g).to(dtype)
    fresh = held.clone()
    mask = torch.rand(n, generator=g) < frac
    fresh[mask] = torch.randn(int(mask.sum()), generator=g).to(dtype)
    return held, fresh


CASES = [(0, 0.1), (1, 1.0), (3, 0.5), (4097, 0.0), (4097, 1.0), (100_003, 0.003), (100_001, 0.05), (65_537, 0.4)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,frac", CASES)
def test_diff_equals_flatnonzero(k, dtype, n, frac):
    held, fresh = _pair(n, frac, dtype, seed=n)
    ints = dl.INT_OF[held.element_size()]
    expected = np.flatnonzero((held.view(ints) != fresh.view(ints)).numpy()) + 17
    copy, out = held.clone(), np.full(n + 1, -5, dtype=np.int64)
    found = k.diff(fresh.view(ints), copy.view(ints), 17, out)
    assert found == expected.size
    np.testing.assert_array_equal(out[:found], expected)
    assert torch.equal(copy.view(ints), fresh.view(ints))  # the copy took every change, touched nothing else
    if 0 < frac < 1 and n > 1000:  # not vacuous: some changed, some did not
        assert 0 < found < n


def test_diff_compares_bit_patterns_not_values(k):
    held = torch.tensor([0.0, float("nan"), 1.0, -0.0], dtype=torch.bfloat16)
    fresh = torch.tensor([-0.0, float("nan"), 1.0, -0.0], dtype=torch.bfloat16)
    out = np.empty(4, dtype=np.int64)
    assert k.diff(fresh.view(torch.int16), held.clone().view(torch.int16), 0, out) == 1 and out[0] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("positions", [
    [0], [5, 6, 7], [300], [254, 255, 256], [0, 255, 510, 766], [1000, 40_000, 99_999], list(range(0, 100_000, 97)),
])
def test_gap_encoding_equals_the_codec(k, dtype, positions):
    n = 100_000
    new = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype)
    pos = np.asarray(positions, dtype=np.int64)
    bridged = dl.gap_positions(pos)
    assert k.gap_count(pos, dl.MAX_GAP) == bridged.size
    gaps, values = k.gap_encode(pos, dl._bits(new), bridged.size, dl.MAX_GAP)
    np.testing.assert_array_equal(gaps, np.diff(bridged, prepend=-1).astype(np.uint8))
    np.testing.assert_array_equal(values, dl._bits(new)[bridged])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gap_apply_equals_numpy_and_checks_first(k, dtype, monkeypatch):
    held, fresh = _pair(200_003, 0.03, dtype, seed=5)
    held[:1000] = fresh[:1000]  # a long unchanged run: bridging entries
    pos = np.flatnonzero((held.view(dl.INT_OF[held.element_size()]) != fresh.view(dl.INT_OF[held.element_size()])).numpy())
    parts = dl.encode_positions("w", fresh, pos)
    assert "w@gap" in parts
    fast = held.clone()
    assert dl.apply(fast, parts, "w") and torch.equal(fast.view(torch.uint8), fresh.view(torch.uint8))
    monkeypatch.setattr(kernels, "delta_kernels", lambda: None)  # the numpy path gives the same
    slow = held.clone()
    assert dl.apply(slow, parts, "w") and torch.equal(slow.view(torch.uint8), fast.view(torch.uint8))
    monkeypatch.undo()
    # A gap walking past the end is refused before anything is written.
    bad = dict(parts, **{"w@gap": parts["w@gap"].clone()})
    bad["w@gap"][-1] = 255
    target = held.clone()
    assert int(bad["w@gap"].numpy().sum(dtype=np.int64)) - 1 >= target.numel()  # the last change sits near the end
    with pytest.raises(ValueError, match="gaps reach element"):
        dl.apply(target, bad, "w")
    assert torch.equal(target, held)


@pytest.mark.parametrize("source_dtype,served", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_differ_compiled_equals_numpy_on_strided_sources(k, source_dtype, served):
    """Column slices (strided, as a row-parallel part), rows of several chunks; float64 has no
    kernel (8-byte elements) and takes the numpy path inside the same differ."""
    g = torch.Generator().manual_seed(11)
    param = torch.randn(700, 1200, generator=g).to(source_dtype)
    pieces = [LocalPiece("a", (1, 100, 600), param[:, 100:700], served, (700, 600)),
              LocalPiece("b", None, param[:50], served, (50, 1200))]
    fast, slow = PieceDiffer(), PieceDiffer(kernels=None)
    assert fast.kernels is not None
    fast.refresh(pieces)
    slow.refresh(pieces)
    for step in range(3):
        with torch.no_grad():
            param.add_(torch.randn(param.shape, generator=g).to(source_dtype) * 10 ** (-3 + step) * param.abs())
        for piece in pieces:
            a, b = fast.diff(piece), slow.diff(piece)
            assert sorted(a) == sorted(b) and a, (step, sorted(a))
            for key in a:
                assert torch.equal(a[key].contiguous().view(-1).view(torch.uint8),
                                   b[key].contiguous().view(-1).view(torch.uint8)), key
        for key in fast.held:
            assert torch.equal(fast.held[key].view(torch.uint8), slow.held[key].view(torch.uint8))


def test_unavailable_kernels_mean_numpy(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAPO_MEGATRON_NATIVE", "0")
    kernels.delta_kernels.cache_clear()
    try:
        assert kernels.delta_kernels() is None and PieceDiffer().kernels is None
        monkeypatch.setenv("SAPO_MEGATRON_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("SAPO_MEGATRON_CACHE", str(tmp_path / "cache"))
        kernels.delta_kernels.cache_clear()
        with caplog.at_level("WARNING"):
            assert kernels.delta_kernels() is None
        assert "no C compiler" in caplog.text and "numpy" in caplog.text
    finally:
        kernels.delta_kernels.cache_clear()


def test_build_is_cached_by_source_and_compiler(k, tmp_path, monkeypatch):
    monkeypatch.setenv("SAPO_MEGATRON_CACHE", str(tmp_path))
    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert first.parent == tmp_path / "native" and not list(first.parent.glob(".kernels-*"))  # no temporaries left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [1, 37, 300])
def test_gaps_apply_in_place_into_a_run_of_columns(k, dtype, cols, monkeypatch):
    """A row-parallel region (``matrix.narrow(1, start, cols)``) takes its gap encoding in place,
    as the contiguous copy-out-and-back (the numpy path) does; the other columns stay as they were."""
    g = torch.Generator().manual_seed(cols)
    matrix = torch.randn(400, 500, generator=g).to(dtype)
    region = matrix.narrow(1, 120, cols)
    new = region.contiguous().clone()
    new.view(-1)[torch.rand(new.numel(), generator=g) < 0.04] += 1
    new.view(-1)[-1] += 1  # the last element too
    pos = np.flatnonzero((new.view(-1).view(dl.INT_OF[new.element_size()]) !=
                          region.contiguous().view(-1).view(dl.INT_OF[new.element_size()])).numpy())
    parts = dl.encode_positions("w", new, pos)
    assert "w@gap" in parts
    fast, slow = matrix.clone(), matrix.clone()
    assert dl.apply(fast.narrow(1, 120, cols), parts, "w")
    monkeypatch.setattr(kernels, "delta_kernels", lambda: None)
    assert dl.apply(slow.narrow(1, 120, cols), parts, "w")
    assert torch.equal(fast.view(torch.uint8), slow.view(torch.uint8))
    assert torch.equal(fast.narrow(1, 120, cols).view(torch.uint8), new.view(torch.uint8))
    outside = torch.ones(500, dtype=torch.bool)
    outside[120 : 120 + cols] = False
    assert torch.equal(fast[:, outside].view(torch.uint8), matrix[:, outside].view(torch.uint8))
    monkeypatch.undo()
    bad = dict(parts, **{"w@gap": parts["w@gap"].clone()})
    bad["w@gap"][-1] = 255
    untouched = matrix.clone()
    with pytest.raises(ValueError, match="gaps reach element"):
        dl.apply(untouched.narrow(1, 120, cols), bad, "w")
    assert torch.equal(untouched, matrix)


def test_a_dense_part_does_not_keep_a_huge_positions_buffer(k, monkeypatch):
    """The compiled diff's positions buffer grows to a part's changes and is dropped after a part
    that needed more than ``KEEP_POSITIONS`` (a dense change of an embedding, say); the part's
    encoding is unaffected (it never holds a view of the buffer)."""
    from sapo_megatron.rollout.sglang.weight_sync import delta_pieces

    monkeypatch.setattr(delta_pieces, "KEEP_POSITIONS", 1 << 18)
    param = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))
    piece = LocalPiece("e", None, param, torch.bfloat16, (1 << 20,))
    fast, slow = PieceDiffer(), PieceDiffer(kernels=None)
    fast.refresh([piece])
    slow.refresh([piece])
    with torch.no_grad():
        param[::3] += 1.0  # a third changed: ~350 k positions, more than the buffer keeps
    a, b = fast.diff(piece), slow.diff(piece)
    assert fast._positions.size == delta_pieces.CHUNK_ELEMENTS  # dropped after the part
    assert sorted(a) == sorted(b) == ["e@bits", "e@val"]
    for key in a:
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8))
