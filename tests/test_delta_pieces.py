"""The delta sync's shard-local trainer side against the server's loader, bit for bit.

Every rank diffs only its own slices (tests/dist/delta_pieces_worker.py): the regions of each HF
tensor it holds (rows of column-parallel, QKV and gate/up slices; columns of row-parallel ones;
replicated tensors on one holder). The server's code (``sapo_sglang.delta_loader``) applies every
rank's file to the last full export and must get the new export exactly; the region digests the
loader computes must equal the trainer's. The single-process codec is tests/test_delta_codec.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.dist.ckpt_models import make_hf_model
from tests.launch import torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).parent / "dist" / "delta_pieces_worker.py"


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"], ["--pp", "2"]], ids=["tp2", "ep2", "pp2"])
def test_rank_local_deltas_rebuild_the_export(tmp_path, layout):
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    torchrun(WORKER, *layout, "--hf", str(hf), "--out", str(tmp_path / "out"), nproc=2)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    # Not vacuous: the change reached most HF tensors, and the four encodings all occurred.
    assert result["differs_before"] > result["tensors"] // 2, result
    assert {"full", "idx", "gap", "bits"} <= set(result["kinds"]), result
    assert result["equal"], result
    # The compiled kernels ran (a C compiler is on this machine) and equal the numpy path.
    if shutil.which(os.environ.get("CC") or "cc"):
        assert result["native"], result
    assert result["native_equal"], result
    # The plan is reused while the parameters stay put and rebuilt on every rank when one moves.
    assert all(c == {"kept": True, "rebuilt": True, "views": True} for c in result["plan_cache"]), result
    assert result["digests_equal"] and result["digests"] > 0, result
    # The ranks' regions cover every element of the model exactly once.
    assert result["covered"] == result["elements"], result
    assert 0 < result["delta_bytes"] < result["full_bytes"], result
    if layout[0] == "--tp":  # row-parallel weights travel as column regions, the rest as rows
        assert result["region_dims"] == [0, 1], result
