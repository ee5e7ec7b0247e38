"""Delta weight sync (``rollout.sglang.delta: true``) against the REAL SGLang 0.5.23 server.

The trainer (2 ranks, TP 2) trains 3 steps at lr 1e-6: the push at start (version 0) is a full
disk sync, the next three send only the bf16 elements that changed, through ``/update_weights_from_tensor`` and
our ``--custom-weight-loader``. Afterwards the server must serve exactly the trainer's weights:
the same ``/weights_checker`` checksum as a second server that loaded the trainer's own HF export
from disk (and not the untrained model's, the guard that the comparison can fail). A corrupted
delta (one mantissa bit flipped in the file, by ``delta_fault``) must be caught by the checksum
and repaired by a full sync, with a warning.
"""

from __future__ import annotations

import os
import shutil

from tests.real_sglang.harness import CORRUPTING_LOADER
from tests.real_sglang.test_trainer_real import _config, assert_serves, assert_trained, export_hf, train


def _delta_config(tmp_path, model, url, **sglang):
    config = _config(tmp_path, model, [url], steps=3, mode="R3", reward="digits",
                     sglang={"delta": True, "delta_checksum_every": 1, **sglang})
    config["optim"]["lr"] = 1.0e-6  # an RL learning rate: most bf16 elements keep their bits
    return config


def test_delta_sync_serves_the_trained_weights_bit_for_bit(servers, tiny_model, tmp_path):
    a, b = servers.keyed("a", "b")
    untrained = a.checksum()["per_engine_checksum"]
    rows = train(tmp_path, _delta_config(tmp_path, tiny_model, a.url))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert_trained(rows)
    deltas = [r for r in rows if "weight_sync/delta_bytes" in r]
    assert len(deltas) == 3, "the pushes of versions 1-3 were deltas (version 0's, at start, is the full sync)"
    assert sum(r["weight_sync/delta_fallbacks"] for r in rows) == 0
    for r in deltas:
        assert 0 < r["weight_sync/delta_bytes"] < r["weight_sync/delta_full_bytes"], r
    assert sum(r.get("weight_sync/full_syncs", 0) for r in rows) == 1
    assert sum(r.get("weight_sync/delta_checksums", 0) for r in rows) == 3, "every delta was checksummed"
    # The trainer's diff and every server process's apply ran the compiled kernels (a C
    # compiler is on this machine; without one both take their numpy paths, tested alike).
    if shutil.which(os.environ.get("CC") or "cc"):
        assert all(r["weight_sync/delta_server_native"] == 1.0 for r in deltas), deltas
    assert a.call("/model_info")[1]["weight_version"] == "3"
    assert_serves(a, b, export_hf(tmp_path, tmp_path / "run"), untrained)


def test_corrupted_delta_falls_back_to_a_full_sync(servers, tiny_model, tmp_path):
    a, b = servers.keyed("a", "b")
    untrained = a.checksum()["per_engine_checksum"]
    rows = train(tmp_path, _delta_config(tmp_path, tiny_model, a.url, delta_loader=CORRUPTING_LOADER))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sum(r["weight_sync/delta_fallbacks"] for r in rows) == 1, [r.get("weight_sync/delta_fallbacks") for r in rows]
    assert sum(r.get("weight_sync/full_syncs", 0) for r in rows) == 2, "the push at start, then the fallback"
    assert a.call("/model_info")[1]["weight_version"] == "3"
    assert_serves(a, b, export_hf(tmp_path, tmp_path / "run"), untrained)
