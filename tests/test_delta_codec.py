"""The delta codec (``sapo_sglang.delta_loader``): encode/apply round trips bit for bit, the
encoding chosen is the smallest, and the loader's state machine (base, chain, errors) without a
server (the wire is tests/real_sglang/test_delta_real.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sapo_sglang import delta_loader as dl


def _bf16_step(shape, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(shape, generator=g).to(torch.bfloat16)
    new = old.clone()
    mask = torch.rand(shape, generator=g) < frac
    new[mask] = (old[mask].float() * 1.01 + 1e-3).to(torch.bfloat16)
    return old, new


@pytest.mark.parametrize("frac,kind", [(0.001, dl.INDEX), (0.05, dl.GAP), (0.3, dl.BITMAP), (1.0, dl.FULL)])
def test_round_trip_and_smallest_encoding(frac, kind):
    old, new = _bf16_step((37, 53), frac)
    assert not torch.equal(old, new)  # guard: there is something to send
    parts = dl.encode("w", old, new)
    assert any(k.endswith(kind) for k in parts), sorted(parts)
    full = new.numel() * 2
    assert dl.encoded_nbytes(parts) <= full
    target = old.clone()
    assert dl.apply(target, parts, "w")
    assert torch.equal(target.view(torch.int16), new.view(torch.int16))  # bit for bit


def test_gaps_bridge_long_runs_with_unchanged_bits():
    import numpy as np

    assert dl.gap_positions(np.array([0, 600, 601])).tolist() == [0, 255, 510, 600, 601]
    assert dl.gap_positions(np.array([254, 300])).tolist() == [254, 300]  # no gap over MAX_GAP
    # A sparse tail far from a dense head: the gap encoding with bridges, applied, is bit exact.
    old = torch.randn(5000).to(torch.bfloat16)
    new = old.clone()
    new[:400:3] += 1
    new[4990] += 1
    parts = dl.encode_positions("w", new, np.flatnonzero(dl.changed_mask(old, new)))
    assert "w" + dl.GAP in parts and parts["w" + dl.GAP].numel() > 134 + 1  # bridged
    target = old.clone()
    dl.apply(target, parts, "w")
    assert torch.equal(target.view(torch.int16), new.view(torch.int16))
    parts["w" + dl.GAP][-1] = 0  # a zero gap is corrupt
    with pytest.raises(ValueError, match="zero gap"):
        dl.apply(old.clone(), parts, "w")


def test_unchanged_sends_nothing_and_bit_patterns_count():
    old = torch.tensor([0.0, 1.0, float("nan")], dtype=torch.bfloat16)
    assert dl.encode("w", old, old.clone()) == {}
    new = torch.tensor([-0.0, 1.0, float("nan")], dtype=torch.bfloat16)  # -0.0 == 0.0 numerically
    parts = dl.encode("w", old, new)
    target = old.clone()
    dl.apply(target, parts, "w")
    assert torch.equal(target.view(torch.int16), new.view(torch.int16))


def test_fp32_and_odd_sizes_and_bitmap_pack():
    old, new = _bf16_step((13,), 0.5, seed=3)
    old, new = old.float(), new.float()
    target = old.clone()
    dl.apply(target, dl.encode("b", old, new), "b")
    assert torch.equal(target, new)
    mask = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.3
    assert torch.equal(dl.unpack_bits(dl.pack_bits(mask), 1001), mask)


def test_corrupt_parts_are_refused():
    old, new = _bf16_step((20000,), 0.0005)
    parts = dl.encode("w", old, new)
    assert "w" + dl.INDEX in parts, sorted(parts)
    parts["w" + dl.INDEX] = parts["w" + dl.INDEX] + 10_000
    with pytest.raises(ValueError, match="indices"):
        dl.apply(old.clone(), parts, "w")
    with pytest.raises(ValueError, match="same shape"):
        dl.encode("w", old, new[:3])


def test_loader_state_chain_and_ack(tmp_path):
    old, new = _bf16_step((8, 8), 0.1)
    base = tmp_path / "step_1"
    base.mkdir()
    save_file({"w": old}, str(base / "model.safetensors"))
    save_file(dl.encode("w", old, new), str(tmp_path / "d2.safetensors"))
    state = {"key": None, "tensors": None}
    msg = {"run": "r", "from": 1, "to": 2, "files": [str(tmp_path / "d2.safetensors")],
           "base": {"dir": str(base), "version": 1}, "checksum": True, "fresh": True}
    ack = dl.apply_message(None, msg, state)
    assert ack["ok"] and ack["version"] == 2 and ack["changed"] == 1
    assert ack["digests"]["w"] == dl.digest(new) != dl.digest(old)
    # after a full sync (a new base directory at the chain's version) the copy is rebuilt from it,
    # even though the version matches: a corrupted copy never outlives a fallback
    state["tensors"]["w"].view(-1)[0] += 1  # the copy went wrong
    rebuilt = tmp_path / "step_2"
    rebuilt.mkdir()
    save_file({"w": new}, str(rebuilt / "model.safetensors"))
    save_file({}, str(tmp_path / "d3.safetensors"))
    again = {**msg, "from": 2, "to": 3, "files": [str(tmp_path / "d3.safetensors")],
             "base": {"dir": str(rebuilt), "version": 2}}
    assert dl.apply_message(None, again, state)["digests"]["w"] == dl.digest(new)
    # a server whose copy is gone after it took deltas (restarted): refused, never rebuilt from the base
    with pytest.raises(RuntimeError, match="restarted"):
        dl.apply_message(None, {**again, "from": 3, "to": 4, "fresh": False}, {"key": None, "tensors": None})
    # a chain that does not continue from what this copy holds, with no base of that version: refused
    with pytest.raises(RuntimeError, match="full sync is needed"):
        dl.apply_message(None, {**msg, "from": 5, "to": 6}, state)
    # the hook never raises; it acks the error
    bad = dl.message(**{**msg, "from": 7, "to": 8, "ack": str(tmp_path / "ack")})
    dl.apply_delta(None, [(bad, torch.empty(0))])
    written = json.loads((tmp_path / "ack.tp0.json").read_text())
    assert not written["ok"] and "full sync" in written["error"]


def test_server_checks_and_config_refusals():
    from sapo_megatron.rollout.sglang.config import SGLangConfig
    from sapo_megatron.rollout.sglang.weight_sync.delta import check_delta_server

    check_delta_server("u", {"custom_weight_loader": [dl.LOADER], "quantization": None})  # fine
    with pytest.raises(RuntimeError, match="--custom-weight-loader sapo_sglang.delta_loader.apply_delta"):
        check_delta_server("u", {"custom_weight_loader": []})
    with pytest.raises(RuntimeError, match="quantizes the weights"):
        check_delta_server("u", {"custom_weight_loader": [dl.LOADER], "quantization": "fp8"})
    from sapo_megatron.rollout.sglang.weight_sync.delta import DeltaSync

    with pytest.raises(ValueError, match="quantized"):
        DeltaSync(None, {"quantization_config": {"quant_method": "fp8"}}, SGLangConfig(delta=True), "/tmp/x")
    with pytest.raises(ValueError, match="rollout.sglang.delta must be false with weight_sync: distributed"):
        SGLangConfig(delta=True, weight_sync="distributed")
    with pytest.raises(ValueError, match="delta_checksum_every"):
        SGLangConfig(delta=True, delta_checksum_every=-1)


def test_the_message_travels_as_an_empty_tensor():
    """What SGLang's tp_worker unpickles: ``[(message, tensor)]`` with no storage to share."""
    import base64
    import pickle

    from sapo_megatron.rollout.sglang.weight_sync.delta import serialized_message

    msg = dl.message(run="r", files=["/x"], to=3, **{"from": 2})
    blobs = serialized_message(msg, tp_size=2)
    assert len(blobs) == 2 and blobs[0] == blobs[1]
    raw = base64.b64decode(blobs[0])
    assert b"rebuild_storage_empty" in raw and b"rebuild_storage_fd" not in raw  # crosses hosts
    [(name, tensor)] = pickle.loads(raw)
    assert name == msg and tensor.numel() == 0
