"""The trainer, 3 steps, ``rollout.engine=sglang`` with ``weight_sync=distributed`` (gloo) against
two REAL receiving servers (tests/dist/sglang_receiver.py), one of which restarts mid-run.

What must hold: every step samples from the weights the trainer holds (versions 0, 1, 2 in
order, never the restarted server's launch weights); the restarted server is found stale, its
answers are discarded, it is re-synced (the group rebuilt) and ends with the same weights,
byte for byte, as the server that never restarted; the weights served are the trained ones.

Run: ``pytest -m dist tests/test_trainer_sglang_distributed.py`` (torchrun, about two minutes).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist.ckpt_models import make_hf_model, read_safetensors_dir
from tests.launch import torchrun
from tests.sglang_receivers import dump_weights, start_receiver

CONFIG = """
run: {{output_dir: {out}, steps: 3, save_every: 3, tensorboard: false}}
model: {{preset: null, hf_dir: {hf}}}
parallel: {{tensor_model_parallel_size: 2}}
optim: {{lr: 1.0e-3}}
rollout:
  engine: sglang
  prompts_per_step: 4
  samples_per_prompt: 4
  max_new_tokens: 4
  sglang:
    urls: ["{a}", "{b}"]
    retries: 3
    backoff_s: 0.1
    timeout_s: 60
    weight_timeout_s: 120
    weight_sync: distributed
    distributed: {{master_address: 127.0.0.1, backend: gloo, bucket_mb: 0.05}}
train: {{micro_batch_size: 4, updates_per_rollout: 2}}
routing: {{mode: R3}}
task: {{name: arithmetic}}
"""


def _start(tmp_path, name, *extra):
    # The tiny HF model: 2 layers (layer 0 dense), 4 experts top-2; vocabulary 16 for the task.
    return start_receiver(tmp_path / f"{name}.port", "--layers", "2", "--experts", "4", "--topk", "2",
                          "--dense", "0", "--vocab", "16", *extra)


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_syncs_distributed_and_resyncs_a_restarted_server(tmp_path):
    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    a_proc, a = _start(tmp_path, "a")
    # b restarts at its 12th /generate: in step 2 (each step sends it 8 of the 16 requests).
    b_proc, b = _start(tmp_path, "b", "--die-at", "12")
    try:
        out = tmp_path / "run"
        config = tmp_path / "dist.yaml"
        config.write_text(CONFIG.format(out=out, hf=hf, a=a, b=b))
        torchrun("sapo_megatron.cli", "train", "--config", config, nproc=2, module=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["abort_frac"] == 0.0 for r in rows), "the dropped request was retried elsewhere"
        assert sum(r["sglang/resynced_servers"] for r in rows) == 1  # b, once
        assert rows[0]["sglang/resynced_servers"] == 0
        got_a, got_b = dump_weights(a, tmp_path / "a.pt"), dump_weights(b, tmp_path / "b.pt")
    finally:
        for p in (a_proc, b_proc):
            p.kill()
            p.wait(timeout=10)
    assert got_a["version"] == got_b["version"] == "3"
    wa, wb = got_a["weights"], got_b["weights"]
    original = read_safetensors_dir(hf)
    assert set(wa) == set(wb) == set(original)
    for name in wa:  # the restarted server holds exactly what the other one does
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name].view(torch.uint8), wb[name].view(torch.uint8)), name
    changed = [n for n in original if not torch.equal(wa[n].float(), original[n].float())]
    assert changed, "the servers hold the initial weights, not the trained ones"
