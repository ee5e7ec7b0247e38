"""The export's pieces (``checkpoint.pieces``) against the full-tensor reference, on one process.

Each tensor-parallel layout is simulated with ``sharding``'s own slicing convention (dim-0 or
dim-1 chunks; a GLU ``linear_fc1`` slice is ``[gate_r; up_r]``): placing every holder's pieces
into empty HF tensors must give exactly ``to_hf`` of the full tensor (bit for bit: only views and
copies, nothing is computed).
"""

from __future__ import annotations

import types

import pytest
import torch

from sapo_megatron.checkpoint.pieces import carve, piece_source, piece_target, place, plan_pieces
from sapo_megatron.checkpoint.transforms import to_hf

CFG = types.SimpleNamespace(num_attention_heads=8, num_key_value_heads=4, kv_channels=3)
HIDDEN = 6


def _shard(full, kind, size, dim, r):
    if kind == "gate_up":  # sharding.shard_full_tensor for a GLU fc1
        return torch.cat([half.chunk(size, dim)[r] for half in full.chunk(2, dim)], dim)
    return full.chunk(size, dim)[r]


CASES = {  # kind, full shape, partition dim
    "copy_rows": ("copy", (8, HIDDEN), 0),
    "copy_cols": ("copy", (HIDDEN, 8), 1),
    "gate_up": ("gate_up", (16, HIDDEN), 0),
    "qkv": ("qkv", ((8 + 2 * 4) * 3, HIDDEN), 0),
}


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dst", [0, 3])
def test_pieces_rebuild_the_hf_tensors_of_the_full_tensor(case, size, dst):
    kind, shape, dim = CASES[case]
    full = torch.randn(shape, generator=torch.Generator().manual_seed(size))
    want = to_hf(kind, full, CFG)
    holders = [3, 1, 0, 2][:size]  # holder of tp rank r: holders[r], any order of global ranks
    layouts = {h: (r, size, dim) if size > 1 else None for r, h in enumerate(holders)}
    local = {h: _shard(full, kind, size, dim, r) for r, h in enumerate(holders)}
    pieces = plan_pieces("w", kind, [tuple(t.shape) for t in want], holders, layouts, dst)
    got = [torch.full_like(t, float("nan")) for t in want]
    for piece in pieces:
        tp = layouts[piece.rank][1] if layouts[piece.rank] else 1
        place(piece_target(piece, got[piece.hf]), piece_source(piece, kind, local[piece.rank], CFG, tp))
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # every element written (NaN otherwise), and to the right place
    if size == 1:  # unsharded: dst sends nothing to itself when it holds the tensor
        assert {p.rank for p in pieces} == {dst if dst in holders else holders[0]}
    else:
        assert {p.rank for p in pieces} == set(holders)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="one holder per tensor-parallel rank"):
        plan_pieces("w", "copy", [(8, 2)], [0, 1], {0: (0, 2, 0), 1: (0, 2, 0)}, 0)
    with pytest.raises(ValueError, match="disagree"):
        plan_pieces("w", "copy", [(8, 2)], [0, 1], {0: (0, 2, 0), 1: None}, 0)
    with pytest.raises(ValueError, match="only dim 0"):
        plan_pieces("w", "gate_up", [(8, 2), (8, 2)], [0, 1], {0: (0, 2, 1), 1: (1, 2, 1)}, 0)
    with pytest.raises(ValueError, match="whole groups"):
        to_hf("qkv", torch.zeros(48, 2), CFG, shards=8)


def test_carve_is_back_to_back_and_refuses_unaligned():
    buf = torch.arange(24, dtype=torch.uint8)
    a, b = carve(buf, [("a", torch.float32, (2, 2)), ("b", torch.bfloat16, (4,))])
    assert a.data_ptr() == buf.data_ptr() and b.data_ptr() == buf.data_ptr() + 16
    with pytest.raises(ValueError, match="not a multiple"):
        carve(buf, [("a", torch.uint8, (1,)), ("b", torch.float32, (1,))])
