"""Bad input to checkpoint conversion fails early with an error naming the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sapo_megatron.checkpoint import (
    McoreCheckpoint,
    hf_to_mcore,
    load_into_model,
    mcore_to_hf,
    model_config_from_hf,
)
from sapo_megatron.checkpoint.parity import build_model_for_hf_config
from tests.dist.ckpt_models import make_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model("qwen3_moe", tmp_path_factory.mktemp("err") / "hf")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_shard_file(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "hf")
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"absent.*model-00002-of-00002\.safetensors.*lm_head\.weight"):
        hf_to_mcore(bad, tmp_path / "out", show_progress=False)


def test_config_does_not_match_tensors(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "hf")
    _edit_config(bad, head_dim=8)
    with pytest.raises(ValueError, match=r"q_proj\.weight' has shape \(48, 32\).*implies \(32, 32\).*head_dim"):
        hf_to_mcore(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"


def test_config_implies_absent_tensors(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "hf")
    _edit_config(bad, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"absent from the checkpoint.*model\.layers\.2\."):
        hf_to_mcore(bad, tmp_path / "out", show_progress=False)


@pytest.mark.parametrize(
    "arch,match",
    [
        ("LlamaForCausalLM", r"unsupported architecture 'LlamaForCausalLM'; supported: .*Qwen3MoeForCausalLM"),
        ("DeepseekV3ForCausalLM", r"unsupported architecture DeepseekV3ForCausalLM: .*multi-latent attention"),
    ],
)
def test_unsupported_architecture(hf_dir, tmp_path, arch, match):
    bad = _copy(hf_dir, tmp_path / "hf")
    _edit_config(bad, architectures=[arch])
    with pytest.raises(ValueError, match=match):
        hf_to_mcore(bad, tmp_path / "out", show_progress=False)


def test_unsupported_features_are_named():
    base = json.loads(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 4,
        "num_experts_per_tok": 2,
    }))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        model_config_from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(dict(base, attention_bias=True))
    with pytest.raises(ValueError, match="sliding-window"):
        model_config_from_hf(dict(base, use_sliding_window=True))


def test_foreign_checkpoint_layouts(hf_dir, tmp_path):
    dist_ckpt = tmp_path / "megatron_dist"
    dist_ckpt.mkdir()
    (dist_ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(ValueError, match=r"Megatron-Core dist_checkpointing checkpoint \(sharded_backend='torch_dist'\)"):
        McoreCheckpoint(dist_ckpt)
    legacy = tmp_path / "legacy"
    (legacy / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"legacy per-rank Megatron checkpoint \(mp_rank_\*\)"):
        McoreCheckpoint(legacy)
    with pytest.raises(ValueError, match="Hugging Face model directory"):
        mcore_to_hf(hf_dir, tmp_path / "x", show_progress=False)


def test_newer_format_version(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "ckpt", show_progress=False)
    meta_path = tmp_path / "ckpt" / "sapo_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="format_version 99"):
        McoreCheckpoint(tmp_path / "ckpt")


def test_model_built_from_another_config(single_rank_parallel, hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "ckpt", show_progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    chunks = build_model_for_hf_config(dict(config, moe_intermediate_size=24))
    with pytest.raises(ValueError, match=r"local_experts\.0\.linear_fc1\.weight' has full shape \(32, 32\).*\(48, 32\)"):
        load_into_model(chunks, tmp_path / "ckpt")
    deeper = build_model_for_hf_config(dict(config, num_hidden_layers=4))
    with pytest.raises(ValueError, match=r"has no tensor\(s\) \['decoder\.layers\.2\."):
        load_into_model(deeper, tmp_path / "ckpt")


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "ckpt", show_progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        hf_to_mcore(hf_dir, tmp_path / "ckpt", show_progress=False)
    assert McoreCheckpoint(tmp_path / "ckpt").names()
