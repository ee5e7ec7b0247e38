"""HF <-> Megatron-Core checkpoint conversion, proven against HF transformers' logits.

Tiny random HF models (tests/dist/ckpt_models.py) are converted with ``hf_to_mcore``; the
Megatron-Core model loaded from the result must reproduce HF's float32 logits at TP=1 (here,
in-process) and at TP=2, EP=2 and PP=2 (torchrun + gloo, tests/dist/ckpt_worker.py), and every
way back to HF (offline ``mcore_to_hf``, live ``export_hf`` from any layout) must return the
original tensors bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist.ckpt_models import ARCHS, make_hf_model, read_safetensors_dir
from tests.launch import ROOT, run_python, torchrun

from sapo_megatron.checkpoint import (
    McoreCheckpoint,
    export_hf,
    hf_to_mcore,
    load_hf_into_model,
    load_into_model,
    mcore_to_hf,
    model_config_from_hf,
    save_from_model,
)
from sapo_megatron.checkpoint.parity import (
    build_model_for_hf_config,
    hf_logits,
    mcore_logits,
    random_input_ids,
)
from sapo_megatron.checkpoint.transforms import merge_qkv, split_qkv
from sapo_megatron.step.sharding import unwrap

WORKER = Path(__file__).parent / "dist" / "ckpt_worker.py"

# float32 on both sides. HF and Megatron-Core compute the same functions with different
# operation order (one fused QKV matmul vs three, split matmuls + all-reduce under TP, a
# different softmax/top-k code path), which moves logits of magnitude ~0.1-1 by a few ulp,
# ~1e-7..1e-6 (measured: <= 3e-7). A mapping error (swapped gate/up, mis-interleaved heads,
# wrong router scoring) moves them by >= 1e-3 even with these tiny init-std-0.02 weights
# (see test_tolerance_detects_a_wrong_mapping).
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (hf_dir, ckpt_dir)} for every supported test architecture."""
    root = tmp_path_factory.mktemp("ckpt_models")
    out = {}
    for arch in ARCHS:
        hf = make_hf_model(arch, root / arch / "hf")
        ckpt = root / arch / "ckpt"
        hf_to_mcore(hf, ckpt, show_progress=False)
        out[arch] = (hf, ckpt)
    return out


def _hf_config(hf_dir: Path) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


# --------------------------------------------------------------------------- pure format changes


def test_qkv_interleave_layout_and_inverse():
    heads, groups, d, hidden = 6, 2, 3, 5
    q = torch.arange(heads * d * hidden, dtype=torch.float32).reshape(heads * d, hidden)
    k = -torch.arange(groups * d * hidden, dtype=torch.float32).reshape(groups * d, hidden) - 1
    v = k - 1000
    qkv = merge_qkv(q, k, v, groups)
    # Group 0 = q heads 0..2, k head 0, v head 0; then group 1.
    per = heads // groups * d
    assert torch.equal(qkv[:per], q[:per])
    assert torch.equal(qkv[per : per + d], k[:d])
    assert torch.equal(qkv[per + d : per + 2 * d], v[:d])
    assert torch.equal(qkv[per + 2 * d : 2 * per + 2 * d], q[per:])
    for a, b in zip(split_qkv(qkv, heads, groups, d), (q, k, v)):
        assert torch.equal(a, b)


def test_model_config_from_hf(models):
    cfg = model_config_from_hf(_hf_config(models["qwen3_moe"][0]))
    assert (cfg.num_experts, cfg.mlp_only_layers, cfg.kv_channels, cfg.rope_theta) == (4, [0], 12, 1e6)
    dots = model_config_from_hf(_hf_config(models["dots1"][0]))
    assert dots.first_k_dense == 1 and dots.moe_layer_pattern() == [0, 1]
    assert dots.megatron["moe_router_score_function"] == "sigmoid"
    assert dots.megatron["moe_shared_expert_intermediate_size"] == 16
    assert model_config_from_hf(_hf_config(models["qwen3"][0])).num_experts == 0


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_mcore_to_hf_is_bit_identical(models, tmp_path, arch):
    hf, ckpt = models[arch]
    mcore_to_hf(ckpt, tmp_path / "back", show_progress=False)
    original, back = read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "back")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert _hf_config(tmp_path / "back") == _hf_config(hf)


def test_multi_shard_export_and_index(models, tmp_path):
    hf, ckpt = models["qwen3_moe"]
    mcore_to_hf(ckpt, tmp_path / "sharded", max_shard_bytes=20_000, show_progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    # The sharded directory is itself a valid input (index.json path of the reader).
    hf_to_mcore(tmp_path / "sharded", tmp_path / "ckpt2", show_progress=False)
    a, b = McoreCheckpoint(ckpt), McoreCheckpoint(tmp_path / "ckpt2")
    assert sorted(a.names()) == sorted(b.names())
    for name, t in a.load(a.names()).items():
        assert torch.equal(t, b.load([name])[name]), name


# --------------------------------------------------------------------------- logits parity, TP=1


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf_single_rank(single_rank_parallel, models, arch):
    hf, ckpt = models[arch]
    chunks = build_model_for_hf_config(_hf_config(hf))
    load_into_model(chunks, ckpt)
    input_ids = random_input_ids(64, batch=2, seq=16, seed=3)
    got, ref = mcore_logits(chunks, input_ids), hf_logits(hf, input_ids)
    assert ref.abs().max() > 0.05, "vacuous comparison: logits are ~0"
    diff = (got - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{arch}: max abs logits diff {diff:.2e}"


def test_tolerance_detects_a_wrong_mapping(single_rank_parallel, models):
    """Swap gate and up in every expert (a plausible table bug): logits move far beyond LOGITS_ATOL."""
    hf, ckpt = models["qwen3_moe"]
    chunks = build_model_for_hf_config(_hf_config(hf))
    load_into_model(chunks, ckpt)
    with torch.no_grad():
        for name, param in unwrap(chunks[0]).named_parameters():
            if "local_experts" in name and name.endswith("linear_fc1.weight"):
                param.copy_(torch.cat(param.detach().chunk(2)[::-1]))
    input_ids = random_input_ids(64, batch=2, seq=16, seed=3)
    diff = (mcore_logits(chunks, input_ids) - hf_logits(hf, input_ids)).abs().max().item()
    assert diff > 10 * LOGITS_ATOL, diff


@pytest.mark.parametrize("arch", ARCHS)
def test_live_load_and_export_single_rank(single_rank_parallel, models, tmp_path, arch):
    hf, ckpt = models[arch]
    config = _hf_config(hf)
    from_ckpt, from_hf = build_model_for_hf_config(config), build_model_for_hf_config(config)
    load_into_model(from_ckpt, ckpt)
    load_hf_into_model(from_hf, hf)
    a, b = unwrap(from_ckpt[0]).state_dict(), unwrap(from_hf[0]).state_dict()
    for name, t in a.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b[name]), name
    export_hf(from_hf, tmp_path / "hf", config)
    original, exported = read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[n], t) for n, t in original.items())
    save_from_model(from_hf, tmp_path / "ckpt", config)
    saved, reference = McoreCheckpoint(tmp_path / "ckpt"), McoreCheckpoint(ckpt)
    assert sorted(saved.names()) == sorted(reference.names())
    ref_tensors = reference.load(reference.names())
    for name, t in saved.load(saved.names()).items():
        assert torch.equal(t, ref_tensors[name]), name


# --------------------------------------------------------------------------- TP=2, EP=2, PP=2


LAYOUTS = {"tp2": ["--tp", "2"], "ep2": ["--ep", "2"], "pp2": ["--pp", "2"]}
MOE_ARCHS = tuple(a for a in ARCHS if a != "qwen3")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_layouts_match_hf(models, tmp_path, layout):
    # Megatron-Core refuses expert parallelism for a dense model.
    archs = MOE_ARCHS if layout == "ep2" else ARCHS
    cases = []
    for arch in archs:
        hf, ckpt = models[arch]
        cases += ["--case", arch, str(hf), str(ckpt), str(tmp_path / arch)]
    out = tmp_path / "result.pt"
    torchrun(WORKER, *LAYOUTS[layout], "--out", out, *cases, nproc=2)
    results = torch.load(out)
    for arch in archs:
        hf, ckpt = models[arch]
        got = results[arch]
        diff = (got["logits"] - hf_logits(hf, got["input_ids"])).abs().max().item()
        assert diff <= LOGITS_ATOL, f"{layout}/{arch}: max abs logits diff {diff:.2e}"
        # Export from the sharded model gathers back exactly the original tensors.
        original, exported = read_safetensors_dir(hf), read_safetensors_dir(tmp_path / arch / "hf")
        assert set(exported) == set(original), f"{layout}/{arch}"
        for name, t in original.items():
            assert torch.equal(exported[name], t), f"{layout}/{arch}: {name}"
        saved, reference = McoreCheckpoint(tmp_path / arch / "ckpt"), McoreCheckpoint(ckpt)
        assert sorted(saved.names()) == sorted(reference.names())
        ref_tensors = reference.load(reference.names())
        for name, t in saved.load(saved.names()).items():
            assert torch.equal(t, ref_tensors[name]), f"{layout}/{arch}: {name}"


# --------------------------------------------------------------------------- tools


def _tool(*args: str):
    return run_python(*args, check=False)


@pytest.mark.slow
def test_compare_logits_tool(models, tmp_path):
    hf, ckpt = models["qwen3_moe"]
    dump = tmp_path / "dump.pt"
    proc = _tool(str(ROOT / "tools" / "compare_logits.py"), "--hf-dir", str(hf), "--ckpt", str(ckpt),
                 "--dump", str(dump), "--tol", str(LOGITS_ATOL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("max_abs_diff")][0]
    printed = float(line.split()[1])
    data = torch.load(dump)
    assert set(data) == {"input_ids", "hf_logits", "mcore_logits"}
    assert data["hf_logits"].shape == (*data["input_ids"].shape, 64)
    actual = (data["hf_logits"] - data["mcore_logits"]).abs().max().item()
    assert printed == pytest.approx(actual, rel=1e-3, abs=1e-12) and printed <= LOGITS_ATOL


@pytest.mark.slow
def test_convert_tool_round_trip_and_error(models, tmp_path):
    hf, _ = models["mixtral"]
    tool = str(ROOT / "tools" / "convert_checkpoint.py")
    proc = _tool(tool, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "c"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _tool(tool, "mcore-to-hf", "--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "h"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "h")
    assert set(back) == set(original) and all(torch.equal(back[n], t) for n, t in original.items())
    proc = _tool(tool, "mcore-to-hf", "--ckpt", str(hf), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Hugging Face model directory" in proc.stderr
