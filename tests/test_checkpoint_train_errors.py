"""Training checkpoints on one rank: bad input names the file, extra states, initial weights from
a model-only dist checkpoint (what Megatron-Bridge writes), and checkpoints of the earlier format.

All in this process (a world of one). dist_checkpointing's writer starts a spawn-context
Manager; pytest's own entry point is import-safe, and the module is marked slow for the saves.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow

SMALL = dict(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, intermediate_size=16, moe_intermediate_size=8, num_experts=4,
             num_experts_per_tok=2)


def _build(**model):
    from sapo_megatron.models import ModelConfig, ParallelConfig
    from sapo_megatron.step import build_model_chunks, build_optimizer

    chunks = build_model_chunks(ModelConfig(**{**SMALL, **model}), ParallelConfig())
    return chunks, build_optimizer(chunks, lr=1e-3)


@pytest.fixture
def saved(single_rank_parallel, tmp_path):
    from sapo_megatron.trainer import checkpoint as ckpt

    chunks, optimizer = _build()
    ckpt.save_checkpoint(tmp_path, 3, chunks, optimizer, meta={"data": {"position": 5}})
    return tmp_path, chunks, optimizer


def test_published_layout_and_round_trip(saved):
    from sapo_megatron.trainer import checkpoint as ckpt

    root, chunks, optimizer = saved
    path = ckpt.latest_checkpoint(root)
    assert path == root / "checkpoints" / "iter_0000003"
    assert (root / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"
    want = {k: v.clone() for k, v in chunks[0].module.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    meta = ckpt.load_checkpoint(path, chunks, optimizer)
    assert meta["data"] == {"position": 5} and meta["step"] == 3
    got = chunks[0].module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items()), "weights not restored"


def test_pipeline_split_is_part_of_the_layout(saved, monkeypatch, capsys):
    """The layers per pipeline stage are saved with the layout; a checkpoint written before they
    were (an even split) still counts as the same layout; the distributed optimizer's state,
    which reshards across DP only, refuses another split at the same PP size."""
    from pathlib import Path

    from sapo_megatron.trainer import checkpoint as ckpt

    root, chunks, optimizer = saved
    path = ckpt.latest_checkpoint(root)
    meta = json.loads((path / ckpt.META).read_text())
    assert meta["layout"]["pp_layers"] == [2]
    del meta["layout"]["pp_layers"]
    (path / ckpt.META).write_text(json.dumps(meta))
    ckpt.load_checkpoint(path, chunks, optimizer)
    assert "RNG states not restored" not in capsys.readouterr().out

    monkeypatch.setattr(ckpt, "is_distributed_optimizer", lambda _: True)
    here = {"tp": 1, "pp": 2, "pp_layers": [3, 2], "vpp": 1, "ep": 1, "etp": 1, "cp": 1}
    there = {**here, "pp_layers": [2, 3]}
    with pytest.raises(ckpt.CheckpointError, match=r"not PP_LAYERS \[2, 3\] -> \[3, 2\]\. Resume at .*PP_LAYERS=\[2, 3\]"):
        ckpt._check_optimizer_compat(Path("ckpt"), {"optimizer": {"distributed": True}}, None, here, there)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    from sapo_megatron.trainer import checkpoint as ckpt

    root, _, _ = saved
    chunks, optimizer = _build(hidden_size=24)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(ckpt.latest_checkpoint(root), chunks, optimizer)
    msg = str(err.value)
    assert "tensor 'embedding.word_embeddings.weight' has shape (16, 16)" in msg and "expects (16, 24)" in msg


def test_missing_metadata_names_the_file(saved):
    from sapo_megatron.trainer import checkpoint as ckpt

    root, chunks, optimizer = saved
    path = ckpt.latest_checkpoint(root)
    os.remove(path / ".metadata")
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000003/\.metadata is missing"):
        ckpt.load_checkpoint(path, chunks, optimizer)


def test_missing_common_state_names_both_formats(saved):
    """The replicated state is common.pt up to megatron-core 0.18 and an entry of the torch_dist
    files from 0.19 (a GPU run on 0.19 found resume refusing every checkpoint that lacked
    common.pt): a checkpoint has exactly one of the two, and one with neither is refused."""
    import pickle

    from sapo_megatron.trainer import checkpoint as ckpt

    root, chunks, optimizer = saved
    path = ckpt.latest_checkpoint(root)
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    inside = [k for k in metadata.state_dict_metadata if k.startswith(ckpt.COMMON_STATE_KEY)]
    assert bool(inside) != (path / "common.pt").is_file(), "expected exactly one place for the common state"
    if inside:
        for key in inside:
            del metadata.state_dict_metadata[key]
        with open(path / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    else:
        os.remove(path / "common.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000003/common\.pt is missing and .*'common_state/'"):
        ckpt.load_checkpoint(path, chunks, optimizer)


def test_truncated_shard_names_the_file(saved):
    from sapo_megatron.trainer import checkpoint as ckpt

    root, chunks, optimizer = saved
    path = ckpt.latest_checkpoint(root)
    shard = sorted(path.glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard.name} is truncated: {len(data) // 2} bytes"):
        ckpt.load_checkpoint(path, chunks, optimizer)


def test_tracker_pointing_at_a_missing_iteration(saved):
    from sapo_megatron.trainer import checkpoint as ckpt

    root, _, _ = saved
    (root / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("9")
    with pytest.raises(ckpt.CheckpointError, match=r"names iteration 9, but .*iter_0000009 does not exist"):
        ckpt.latest_checkpoint(root)


def test_extra_states_round_trip(single_rank_parallel, tmp_path):
    from sapo_megatron.trainer import checkpoint as ckpt

    class Buffer:  # e.g. an async rollout buffer
        def __init__(self, items):
            self.items = list(items)

        def state_dict(self):
            return {"items": list(self.items)}

        def load_state_dict(self, state):
            self.items = list(state["items"])

    buffer, lagged = Buffer([1, 2, 3]), {"version": 7}
    ckpt.register_stateful("rollout_buffer", buffer)
    ckpt.register_extra_state("lagged", lambda: dict(lagged), lagged.update, per_rank=True)
    try:
        chunks, optimizer = _build()
        ckpt.save_checkpoint(tmp_path, 1, chunks, optimizer)
        buffer.items, lagged["version"] = [], 0
        meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), chunks, optimizer)
    finally:
        ckpt.unregister_extra_state("rollout_buffer")
        ckpt.unregister_extra_state("lagged")
    assert buffer.items == [1, 2, 3] and lagged["version"] == 7
    assert meta["extra_states"] == {"common": ["rollout_buffer"], "per_rank": ["lagged"]}


def test_initial_weights_from_a_model_only_dist_checkpoint(single_rank_parallel, tmp_path):
    """What Megatron-Bridge's torch_dist export is: ``{"model": sharded_state_dict}`` plus
    a tracker; ``model.ckpt_dir`` loads it (the trainer dispatches on is_dist_checkpoint)."""
    from megatron.core import dist_checkpointing

    from sapo_megatron.trainer import checkpoint as ckpt

    source, _ = _build()
    target, _ = _build()
    iter_dir = tmp_path / "iter_0000000"
    iter_dir.mkdir()
    dist_checkpointing.save({"model": source[0].module.sharded_state_dict()}, str(iter_dir))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("0")
    assert ckpt.is_dist_checkpoint(tmp_path)
    differ = [k for k, v in source[0].module.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.equal(v, target[0].module.state_dict()[k])]
    assert differ, "two random inits must differ for the load to show"
    assert ckpt.load_model_weights(target, tmp_path) == iter_dir
    for k, v in source[0].module.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, target[0].module.state_dict()[k]), k


def test_v1_checkpoints_resume_at_their_layout(single_rank_parallel, tmp_path):
    """The earlier format (checkpoints/latest + step_N/rank_*.pt) still resumes; the distributed
    optimizer's v1 files are refused (they lack its parameter state)."""
    from sapo_megatron.trainer import checkpoint as ckpt

    chunks, optimizer = _build()
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    torch.save({"model": [c.state_dict() for c in chunks], "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate()}},
               step / "rank_00000.pt")
    (step / "meta.json").write_text(json.dumps({
        "format": "sapo_megatron.train_checkpoint.v1", "step": 2, "data": {"position": 1},
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "ep": 1, "cp": 1}}))
    (tmp_path / "checkpoints" / "latest").write_text("step_000002")
    want = {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    path = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.load_checkpoint(path, chunks, optimizer)["step"] == 2
    assert all(torch.equal(chunks[0].state_dict()[k], v) for k, v in want.items())
    meta = json.loads((step / "meta.json").read_text())
    meta["layout"]["tp"] = 2
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="resume only at their own layout"):
        ckpt.load_checkpoint(path, chunks, optimizer)


def test_streamed_export_on_one_rank_and_a_checkpoint_of_another_model(single_rank_parallel, tmp_path):
    """``mcore_to_hf`` of a training checkpoint (``TrainingCheckpoint``): the HF tensors are the
    model's own (gate/up split from its fused ``linear_fc1``); a ``meta.json`` whose model config
    does not match the saved tensors is refused naming the tensor and both shapes."""
    import dataclasses

    from safetensors.torch import load_file

    from sapo_megatron.checkpoint import mcore_to_hf
    from sapo_megatron.models import ModelConfig
    from sapo_megatron.trainer import checkpoint as ckpt

    chunks, optimizer = _build()
    model_config = dataclasses.asdict(ModelConfig(**SMALL))
    ckpt.save_checkpoint(tmp_path / "run", 1, chunks, optimizer, meta={"model_config": model_config})
    mcore_to_hf(tmp_path / "run", tmp_path / "hf", show_progress=False)
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    params = dict(chunks[0].module.named_parameters())
    fc1 = params["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.1.mlp.experts.3.gate_proj.weight"], fc1[:8])
    assert torch.equal(hf["model.layers.1.mlp.experts.3.up_proj.weight"], fc1[8:])
    assert torch.equal(hf["model.embed_tokens.weight"], params["embedding.word_embeddings.weight"])

    meta_path = tmp_path / "run" / "checkpoints" / "iter_0000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["moe_intermediate_size"] = 12
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"experts\.linear_fc2\.weight' has shape \(4, 16, 8\) .* expects \(4, 16, 12\)"):
        mcore_to_hf(tmp_path / "run", tmp_path / "hf2", show_progress=False)
