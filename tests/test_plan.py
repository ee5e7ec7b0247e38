"""The memory planner (sapo_megatron.plan) against HF's parameter counts, the measured peak of the
real step on CPU, and the shipped configs and launchers.

Fast: the arithmetic (packed rows, bytes by class), launcher parsing, HF counts from config.json
shapes. Slow: meta-device builds (a subprocess each), the shipped configs' plans. Dist: the
training step at two layouts under a live-tensor tracker, and each shipped config's optimizer
and parallel flags on the tiny model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sapo_megatron.plan import GB, HEADROOM, plan_file
from sapo_megatron.plan.activations import packed_row_tokens
from sapo_megatron.plan.launch import parse_launcher, shipped_launchers
from sapo_megatron.plan.memory import OptimizerLayout, model_state_bytes
from tests.launch import ROOT, torchrun

MEASURE_WORKER = Path(__file__).parent / "dist" / "plan_measure_worker.py"

# config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (the fields that set shapes).
HF_CONFIGS = {
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "qwen3-235b-a22b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536, num_experts=128,
                            num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
}
# Published totals (model cards): 30.5B total / 3.3B activated; 235B total / 22B activated.
PUBLISHED = {"qwen3-30b-a3b": (30.5e9, 3.3e9), "qwen3-235b-a22b": (235e9, 22e9)}


def hf_counts(c: dict) -> tuple[int, int]:
    """(total, active) as transformers' Qwen3MoeForCausalLM lays the modules out, from config.json
    alone (independent of sapo_megatron's ModelConfig): q/k/v/o_proj, q/k_norm, two layer norms,
    a gate and num_experts x (gate, up, down)_proj per sparse layer, embed_tokens, norm, lm_head."""
    h, d, v = c["hidden_size"], c["head_dim"], c["vocab_size"]
    attn = h * c["num_attention_heads"] * d + 2 * h * c["num_key_value_heads"] * d + c["num_attention_heads"] * d * h
    layer = attn + 2 * d + 2 * h + h * c["num_experts"]
    expert = 3 * h * c["moe_intermediate_size"]
    total = c["num_hidden_layers"] * (layer + c["num_experts"] * expert)
    active = c["num_hidden_layers"] * (layer + c["num_experts_per_tok"] * expert)
    outer = v * h * (1 if c["tie_word_embeddings"] else 2) + h
    return total + outer, active + outer


# --- arithmetic ---------------------------------------------------------------------------


def test_packed_row_is_the_sum_of_lengths_rounded_to_tp_and_cp():
    assert packed_row_tokens([8704] * 4, tp=1, sequence_parallel=False, cp=1) == 34816
    assert packed_row_tokens([10, 7, 5], tp=4, sequence_parallel=True, cp=1) == 24  # 22 -> multiple of 4
    assert packed_row_tokens([10, 7, 5], tp=4, sequence_parallel=False, cp=1) == 22
    # CP=2: each sample to a multiple of 4 (12 + 8 + 8), the row to TP x 2CP = 8.
    assert packed_row_tokens([10, 7, 5], tp=2, sequence_parallel=True, cp=2) == 32


def test_main_params_stay_on_the_gpu_unless_precision_aware():
    kwargs = dict(param_bytes=2, grad_reduce_in_fp32=True, dp=4, expert_dp=1)
    plain = OptimizerLayout.from_megatron({"use_distributed_optimizer": True, "optimizer_cpu_offload": True})
    aware = OptimizerLayout.from_megatron({"use_distributed_optimizer": True, "optimizer_cpu_offload": True,
                                           "use_precision_aware_optimizer": True})
    dense, expert = 400, 1000
    shard = dense / 4 + expert / 1
    a = model_state_bytes(dense, expert, opt=plain, **kwargs)
    b = model_state_bytes(dense, expert, opt=aware, **kwargs)
    assert a["weights"] == (2800, 0) and a["gradients"] == (5600, 0)
    assert a["main_params"][0] == 4 * shard and b["main_params"] == (0, 4 * shard)
    assert a["adam_moments"] == b["adam_moments"] == (0, 8 * shard)
    local = model_state_bytes(dense, expert, opt=OptimizerLayout(), **kwargs)  # not distributed: full copies
    assert local["main_params"] == (4 * 1400, 0) and local["adam_moments"] == (8 * 1400, 0)


def test_uneven_pipeline_stages_follow_megatrons_fields():
    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.plan import _stage_layers

    model = preset("qwen3-235b-a22b")
    uneven = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=23,
                            num_layers_in_last_pipeline_stage=23)
    assert [len(s) for s in _stage_layers(model, uneven)] == [23, 24, 24, 23]
    assert [len(s) for s in _stage_layers(model, ParallelConfig(pipeline_model_parallel_size=2))] == [47, 47]


def test_gpu_memory_from_the_config_comments():
    from sapo_megatron.plan import stated_gpu_memory

    assert stated_gpu_memory((ROOT / "configs/qwen3_30b_a3b_sapo.yaml").read_text()) == 80 * GB
    assert stated_gpu_memory("# one node of H200 141 GB GPUs") == 141 * GB
    assert stated_gpu_memory((ROOT / "configs/tiny_cpu.yaml").read_text()) is None


def test_launchers_give_world_size_overrides_and_sglang():
    by_path = {launch.path: launch for launch in shipped_launchers()}
    single = by_path["examples/run_qwen3_30b_a3b_sapo.sh"]
    assert (single.world_size, single.sglang_servers, single.sglang_tp, single.colocated) == (4, 2, 2, True)
    slurm = by_path["examples/slurm/qwen3_30b_a3b_sapo.sbatch"]
    assert slurm.world_size == 8 and slurm.overrides == ("parallel.expert_model_parallel_size=8",)
    assert by_path["examples/slurm/qwen3_235b_a22b_sapo.sbatch"].world_size == 64
    assert parse_launcher(ROOT / "examples/slurm/tiny_cpu.sbatch").world_size == 2


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_counts_match_the_published_totals(name):
    from sapo_megatron.models import preset
    from sapo_megatron.plan.hf_count import hf_param_count

    total, active = hf_counts(HF_CONFIGS[name])
    published_total, published_active = PUBLISHED[name]
    # Model cards round to 3 significant figures (30.5B, 3.3B, 235B, 22B).
    assert abs(total - published_total) / published_total < 0.005, total
    assert abs(active - published_active) / published_active < 0.02, active
    planner = hf_param_count(preset(name))  # what the SGLang side uses
    assert (planner["total"], planner["active"]) == (total, active)


# --- meta-device builds ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,pp,ep", [("qwen3-30b-a3b", 1, 4), ("qwen3-235b-a22b", 2, 8)])
def test_meta_build_counts_add_up_to_hf(name, pp, ep):
    """Every parameter of the model is on exactly one rank of a TP=1 layout: the first and last
    stages' dense parameters plus EP times their expert parameters are HF's total, exactly."""
    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.plan.shard import shard_counts

    counts = shard_counts(preset(name), ParallelConfig(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                                                       expert_tensor_parallel_size=1), world_size=pp * ep)
    assert [c.stage for c in counts] == list(range(pp))
    assert sum(c.dense + ep * c.expert for c in counts) == hf_counts(HF_CONFIGS[name])[0]
    if name == "qwen3-30b-a3b":  # the figures of issue 18's finding 1
        assert (round(counts[0].total / 1e9, 2), round(counts[0].expert / 1e9, 2)) == (8.79, 7.25)


# --- prediction vs a measured CPU step ------------------------------------------------------

# 4 layers, h=256, 8 experts top-2 of width 256, vocab 8192, 4 samples of 256 tokens per
# microbatch: 11.5M parameters, so weights/gradients/Adam (~190 MB) and activations + logits
# (~240 MB) are both far above the fixed overheads (a few MB of Megatron buffers).
MEASURED_MODEL = ["model.preset=tiny-moe", "model.hidden_size=256", "model.num_hidden_layers=4",
                  "model.num_attention_heads=4", "model.num_key_value_heads=4", "model.head_dim=64",
                  "model.moe_intermediate_size=256", "model.intermediate_size=512", "model.num_experts=8",
                  "model.num_experts_per_tok=2", "model.vocab_size=8192", "model.max_position_embeddings=512",
                  "train.micro_batch_size=4", "rollout.max_new_tokens=192"]
PROMPT = 64
LAYOUTS = {
    "1rank-fp32": (1, []),  # fused log-probs, the default
    "1rank-fp32-unfused": (1, ["loss.fused_logprobs=false"]),  # the logits and their gradient
    "ep2-bf16-distopt": (2, ["parallel.expert_model_parallel_size=2", "model.params_dtype=bfloat16",
                             "optim.megatron.use_distributed_optimizer=true"]),
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prediction_matches_measured_peak(layout, tmp_path):
    from sapo_megatron.config import load_config
    from sapo_megatron.plan import plan_config

    nproc, extra = LAYOUTS[layout]
    overrides = MEASURED_MODEL + extra
    out = tmp_path / "measured.json"
    torchrun(MEASURE_WORKER, "--out", out, "--prompt-tokens", PROMPT, *overrides, nproc=nproc)
    measured = json.loads(out.read_text())
    report = plan_config(load_config(None, overrides), world_size=nproc, prompt_tokens=PROMPT, spec="local")
    stage = report.stages[0]
    static = sum(stage.device[k] for k in ("weights", "gradients", "main_params", "adam_moments"))
    peak = max(r["peak"] for r in measured)
    # The planner follows the DDP settings the step really uses.
    assert all(r["grad_reduce_in_fp32"] for r in measured)
    # Not vacuous: activations, logits and the log-prob workspace are a large share of the
    # prediction, so a 15% agreement cannot come from the model states alone; and the model
    # states alone (measured between the steps, Adam moments allocated) agree within 5%.
    assert report.peak_bytes_per_rank - static > 0.4 * report.peak_bytes_per_rank
    before = max(r["before_step"] for r in measured)
    assert abs(before - static) / static < 0.05, (before, static)
    # 15%: what the planner leaves out (Megatron's attention buffer, masks, per-token loss
    # fields, the optimizer step's temporaries) is a few MB here; the tolerance is the issue's.
    assert abs(report.peak_bytes_per_rank - peak) / peak < 0.15, (report.peak_bytes_per_rank, peak)


# --- the shipped configs and launchers -----------------------------------------------------

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))
SBATCH = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples/slurm").glob("*.sbatch"))
PLAN_LINE = re.compile(r"^# plan: (.*)$", re.M)


def _plan(config: str, launcher: str | None = None):
    return plan_file(str(ROOT / config), launch=parse_launcher(ROOT / launcher) if launcher else None)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_fits_and_its_plan_comment_agrees(config):
    report = _plan(config)
    assert report.fits, f"{config}: {report.summary_line()}"
    assert report.headroom >= HEADROOM
    lines = PLAN_LINE.findall((ROOT / config).read_text())
    if report.peak_bytes_per_rank > 1 * GB:  # the GPU configs state their figures
        assert lines == [report.summary_line()], f"{config}: comment says {lines}, the planner {report.summary_line()}"


@pytest.mark.slow
@pytest.mark.parametrize("sbatch", SBATCH)
def test_every_sbatch_layout_fits_and_its_plan_comment_agrees(sbatch):
    launch = parse_launcher(ROOT / sbatch)
    report = _plan(launch.config, sbatch)
    assert report.world_size == launch.world_size
    assert report.fits, f"{sbatch}: {report.summary_line()}"
    lines = PLAN_LINE.findall((ROOT / sbatch).read_text())
    if report.peak_bytes_per_rank > 1 * GB:
        assert lines == [report.summary_line()], f"{sbatch}: comment says {lines}, the planner {report.summary_line()}"


@pytest.mark.slow
def test_plan_command_json(capsys):
    from sapo_megatron.cli import main

    assert main(["plan", "--config", "configs/tiny_cpu.yaml", "--json", "--gpu-memory-gb", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"world_size", "params_per_rank", "peak_bytes_per_rank", "gpu_memory_bytes", "fits"} <= set(out)
    assert out["world_size"] == 2 and out["gpu_memory_bytes"] == 1e9 and out["fits"] is True


# --- the shipped configs' flags, accepted by Megatron on the tiny model -----------------------

# Flags the CPU cannot run, and why (they are checked by Megatron's OptimizerConfig where
# Transformer Engine is installed: test_shipped_optimizer_flags_pass_megatron_validation).
CPU_CANNOT = {
    # megatron-core 0.16's OptimizerConfig asks Transformer Engine's version for it (a TypeError
    # without TE), on every device.
    "use_precision_aware_optimizer": "needs Transformer Engine",
    # HybridDeviceOptimizer keys its host copies by CUDA parameters (a KeyError on CPU tensors).
    "optimizer_cpu_offload": "needs CUDA parameters",
    "optimizer_offload_fraction": "only with optimizer_cpu_offload",
}
# Each GPU config's parallel layout on at most 4 CPU ranks: the 30B one as it is (EP=4); the
# 235B one's TP=4 x PP=2 x EP=16 (64 ranks) scaled to TP=2 x PP=2 x EP=2, keeping SP, PP > 1,
# ETP=1 and expert-DP < DP.
TINY_LAYOUTS = {
    "configs/qwen3_30b_a3b_sapo.yaml": (4, {}),
    "configs/qwen3_235b_a22b_sapo.yaml": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                              "expert_model_parallel_size": 2}),
}


def _shipped(config: str):
    from sapo_megatron.plan import load_for_planning

    return load_for_planning(str(ROOT / config))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(TINY_LAYOUTS))
def test_shipped_flags_run_a_step_on_the_tiny_model(config, tmp_path):
    cfg = _shipped(config)
    nproc, scaled = TINY_LAYOUTS[config]
    parallel = {k: v for k, v in vars(cfg.parallel).items() if v is not None and k != "sequence_parallel"}
    parallel.update(scaled)
    overrides = ["model.preset=tiny-moe", "train.micro_batch_size=2", "rollout.max_new_tokens=8"]
    overrides += [f"parallel.{k}={v}" for k, v in parallel.items()]
    overrides += [f"model.megatron.{k}={v}" for k, v in cfg.model.megatron.items()]
    optim = {k: v for k, v in cfg.optim.megatron.items() if k not in CPU_CANNOT}
    assert optim.get("use_distributed_optimizer"), "the shipped configs shard the optimizer"
    overrides += [f"optim.megatron.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in optim.items()]
    out = tmp_path / "m.json"
    torchrun(MEASURE_WORKER, "--out", out, "--prompt-tokens", 8, *overrides, nproc=nproc, timeout=900)
    losses = [r["loss"] for r in json.loads(out.read_text())]
    assert len(losses) == nproc and all(abs(x) < 1e3 for x in losses)


@pytest.mark.parametrize("config", sorted(TINY_LAYOUTS))
def test_shipped_optimizer_flags_pass_megatron_validation(config):
    pytest.importorskip("transformer_engine", reason="Megatron's precision-aware optimizer check needs TE")
    from megatron.core.optimizer import OptimizerConfig

    OptimizerConfig(optimizer="adam", bf16=True, **_shipped(config).optim.megatron)


# The GPU smoke's memory stage on an H200 (docs/performance.md, 2026-12-04): 2 layers of
# Qwen3-30B-A3B at real widths, bf16, distributed optimizer at DP=1, no recompute, local spec
# (no TE on that machine), one padded 4096-token sample, torch.cuda.max_memory_allocated over two
# training steps, before the fused log-probs existed (the unfused logits). A recorded
# measurement: the planner must stay within 15% of it.
GPU_SLICE_PEAK_BYTES = 47_600_334_336


@pytest.mark.slow
def test_prediction_matches_the_gpu_measured_slice():
    from sapo_megatron.config import load_config
    from sapo_megatron.plan import plan_config

    cfg = load_config(None, ["model.preset=qwen3-30b-a3b", "model.num_hidden_layers=2", "train.micro_batch_size=1",
                             "rollout.max_new_tokens=4000", "optim.megatron.use_distributed_optimizer=true",
                             "train.layout=padded", "loss.fused_logprobs=false"])  # as measured
    report = plan_config(cfg, world_size=1, prompt_tokens=96, spec="local")
    assert report.params_per_rank == 1_868_573_184, "the smoke's parameter count"
    err = report.peak_bytes_per_rank / GPU_SLICE_PEAK_BYTES - 1
    print(f"planner {report.peak_bytes_per_rank / 1e9:.2f} GB vs H200 {GPU_SLICE_PEAK_BYTES / 1e9:.2f} GB: {err:+.1%}")
    assert abs(err) <= 0.15


def test_plan_refuses_a_launcher_it_cannot_read(tmp_path, capsys):
    from sapo_megatron.commands.plan import main

    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\necho hello\n")
    assert main(["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--launcher", str(script)]) == 2
    assert "launches no training config" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--launcher", str(tmp_path / "missing.sh")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_delta_sync_host_copies_are_counted():
    """``rollout.sglang.delta`` adds the trainer's copy of what it last sent (host memory, bf16,
    about this rank's share of the model) and states the servers' copies in the notes."""
    path = str(ROOT / "configs/qwen3_30b_a3b_sapo.yaml")
    plain = plan_file(path)
    delta = plan_file(path, ["rollout.engine=sglang", "rollout.sglang.delta=true"])
    for off, on in zip(plain.stages, delta.stages):
        assert "delta_sync_copy" not in off.host  # guard: the plain plan has no such class
        assert on.host["delta_sync_copy"] == 2 * (on.dense_params + on.expert_params) > 0
    assert any("delta weight sync" in note for note in delta.notes)
