"""The shared-memory buckets' file, on one process: who may map it, and what a failure leaves.

The torchrun tests (tests/test_sglang_weight_sync.py, tests/test_sglang_weight_lifecycle.py)
run the whole handshake; here the two local steps of the set-up (rank 0 creating the file, any
other rank attaching to it) are checked alone, including the paths a test host never takes:
a ``/dev/shm`` too small for two buckets, a file of that name that is not rank 0's.

Run: ``pytest tests/test_weight_sync_shared.py`` (seconds).
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from sapo_megatron.rollout.sglang.weight_sync import shared

BUCKET = 4096  # bytes of one bucket; the file holds two
pytestmark = pytest.mark.skipif(not os.path.isdir(shared.SHM_DIR), reason="needs /dev/shm (Linux)")


def test_a_rank_attaches_only_to_rank_zeros_own_file():
    path, nonce, mapping = shared._create(BUCKET, "t")
    try:
        assert path.startswith(shared.SHM_DIR) and os.path.getsize(path) == 2 * BUCKET
        other = shared._attach(path, nonce, 2 * BUCKET)
        assert other is not None
        other[100:104] = b"abcd"  # one memory: rank 0 sees the other rank's write
        assert mapping[100:104] == b"abcd"
        # Not rank 0's file (another host's /dev/shm holding the same name), wrong size, no file.
        assert shared._attach(path, bytes(len(nonce)), 2 * BUCKET) is None
        assert shared._attach(path, nonce, BUCKET) is None
        assert shared._attach(path + "-missing", nonce, 2 * BUCKET) is None
    finally:
        os.unlink(path)


def test_no_room_in_dev_shm_falls_back_with_a_warning_and_leaves_no_file(monkeypatch, caplog):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = set(os.listdir(shared.SHM_DIR))
    monkeypatch.setattr(shared.os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger=shared.__name__):
        assert shared._create(BUCKET, "t") == (None, None, None)
    assert "cannot reserve 8192 bytes" in caplog.text and "shared_memory: false" in caplog.text
    assert {n for n in set(os.listdir(shared.SHM_DIR)) - before if n.startswith("sapo-wsync-t-")} == set()

