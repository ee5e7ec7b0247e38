"""The trainer's checkpoints end to end, with the distributed optimizer (tests/configs/ckpt_small.yaml).

The CPU demo's loop on 2 ranks at TP=1 (DP=2) with ``optim.megatron.use_distributed_optimizer``:
4 steps straight, and 2 steps + resume + 2 steps, must give the same metrics at steps 2 and 3.
Before dist_checkpointing this resume trained on garbage (the distributed optimizer's
``state_dict()`` leaves the parameter state out), and the next rollout died on NaN
probabilities. Same layout, same ranks, CPU: the comparison is exact.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from sapo_megatron.trainer.checkpoint import has_common_state
from tests.launch import run_python, torchrun

CONFIG = Path(__file__).parent / "configs" / "ckpt_small.yaml"
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _train(out: Path, *overrides: str, check: bool = True):
    return torchrun("sapo_megatron.cli", "train", "--config", CONFIG, f"output_dir={out}", *overrides,
                    nproc=2, module=True, timeout=900, check=check)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ckpt") / "full"
    _train(out)
    return out


def test_layout_on_disk(full_run):
    ckpts = full_run / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["iter_0000002", "iter_0000004"]
    files = {p.name for p in (ckpts / "iter_0000004").iterdir()}
    assert {".metadata", "metadata.json", "meta.json"} <= files
    # The replicated state: common.pt up to megatron-core 0.18, an entry of the torch_dist files after.
    with open(ckpts / "iter_0000004" / ".metadata", "rb") as f:
        assert has_common_state(ckpts / "iter_0000004", pickle.load(f))
    meta = json.loads((ckpts / "iter_0000004" / "meta.json").read_text())
    assert meta["optimizer"] == {"distributed": True, "sharding": "dp_reshardable"}
    assert meta["layout"]["dp"] == 2 and meta["step"] == 4 and "position" in json.dumps(meta["data"])


def test_distributed_optimizer_resume_matches_the_uninterrupted_run(full_run, tmp_path):
    out = tmp_path / "resumed"
    _train(out, "run.steps=2")
    _train(out)  # resumes at step 2 and runs steps 2 and 3
    full, resumed = _metrics(full_run), _metrics(out)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    keys = ("loss", "loss_first_update", "reward_mean", "grad_norm", "ratio_max", "entropy", "lr")
    for a, b in zip(full[2:], resumed[2:]):
        for key in keys:
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]} != {b[key]} after resume"
    # Not vacuous: the model moved between the steps compared, so a stale or garbage optimizer
    # state would show.
    assert full[2]["loss"] != full[3]["loss"] and full[2]["lr"] != full[3]["lr"]


def test_resume_with_a_changed_lr_names_the_key(full_run, tmp_path):
    out = tmp_path / "changed"
    _train(out, "run.steps=2")
    proc = _train(out, "optim.lr=2e-3", check=False)
    assert proc.returncode != 0
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in proc.stderr
    assert "optim.override_scheduler_on_resume=true" in proc.stderr


def test_convert_exports_hf_weights_from_a_training_checkpoint(full_run, tmp_path):
    """``mcore-to-hf --ckpt RUN/checkpoints`` reads the dist checkpoint itself; the HF tensors
    equal the checkpoint's, read back with torch.distributed.checkpoint directly."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    hf = tmp_path / "hf"
    run_python("tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", full_run / "checkpoints", "--out", hf,
               "--no-progress", timeout=600)
    tensors = {}
    for f in hf.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["vocab_size"] == 16
    iter_dir = full_run / "checkpoints" / "iter_0000004"
    want = {"embedding.word_embeddings.weight": torch.empty(16, 64), "output_layer.weight": torch.empty(16, 64),
            "decoder.final_layernorm.weight": torch.empty(64)}
    dcp.load(want, checkpoint_id=str(iter_dir), no_dist=True)
    assert torch.equal(tensors["model.embed_tokens.weight"], want["embedding.word_embeddings.weight"])
    assert torch.equal(tensors["lm_head.weight"], want["output_layer.weight"])
    assert torch.equal(tensors["model.norm.weight"], want["decoder.final_layernorm.weight"])
    # Not the initial weights: 4 steps of training moved the embedding away from a fresh init.
    assert (tensors["model.norm.weight"] - 1.0).abs().max() > 0


def test_async_save_in_the_trainer(full_run, tmp_path):
    """``run.async_save``: the same run, checkpoints written in the background and published at
    the next save / the end; the resume from them matches as before."""
    out = tmp_path / "async"
    _train(out, "run.async_save=true", "run.steps=2")
    ckpts = out / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "2", "published at exit"
    assert not list(ckpts.glob("tmp_*"))
    _train(out, "run.async_save=true")
    full, resumed = _metrics(full_run), _metrics(out)
    for a, b in zip(full[2:], resumed[2:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], f"step {a['step']}"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["iter_0000002", "iter_0000004"]


def test_every_rank_resumes_from_what_rank_0_finds(tmp_path):
    """Whether to resume is decided once (rank 0) and broadcast: a rank whose filesystem view
    lags (tests/dist/resume_worker.py) resumes with the others instead of starting afresh, which
    left rank 0 in the checkpoint load's collective while rank 1 ran the next one."""
    worker = Path(__file__).parent / "dist" / "resume_worker.py"
    proc = torchrun(worker, tmp_path, nproc=2, timeout=120)
    assert "rank 1 sees None" in proc.stdout  # guard: the two views do differ
    assert sorted(line for line in proc.stdout.splitlines() if ": steps " in line) == [
        "rank 0: steps [3, 3]", "rank 1: steps [3, 3]"], proc.stdout
