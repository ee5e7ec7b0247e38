"""GPU smoke run: the first things to try on ONE NVIDIA GPU, in a few minutes, one summary line.

Stages, each in its own process (a failure is reported, the next stage still runs):

1. ``build``: the tiny MoE ``GPTModel`` with the local spec, and with the Transformer Engine
   spec when TE imports (its grouped-GEMM experts checked), in bf16 on the GPU; one
   forward-only log-prob pass each. Without TE the TE build reads ``absent``, which fails the run.
2. ``rl``: the CPU demo's RL config (``tests/configs/tiny_rl.yaml``, TP=1 on one GPU, bf16, R3,
   packed rows)
   for 3 RL steps through the trainer. Before them, the first step's old-log-prob pass (R3
   replay of the embedded engine's routes) and one backward pass of the SAPO loss over the same
   samples are dumped with the weights: log-probs and every parameter's gradient.
3. ``cpu-reference`` (``CUDA_VISIBLE_DEVICES=""``): the same passes on CPU in float32, from the
   dumped (bf16-valued) weights and routes; log-probs AND gradients must match the GPU's within
   bf16 tolerance, and routes shifted to the next expert must miss by far more.
4. ``resume``: ``sapo-megatron train`` for 2 steps with ``run.save_every=2``, then again to 3
   steps from the checkpoint (the trainer's own save/resume, whatever format it writes).
5. ``memory``: a 2-layer slice of Qwen3-30B-A3B at its real widths (vocab 151936, hidden 2048,
   128 experts) on one GPU: the allocator's peak after the build, and over two training steps
   of one 4096-token sample with the distributed optimizer (what the planner predicts).
6. ``bench``: ``benchmarks/bench_logprobs.py`` at vocab 151936 x 8192 tokens in bf16 against
   the HBM floor (bytes it must move / 4.0 TB/s), and the fused output-layer log-probs
   (``loss.fused_logprobs``) against the unfused path at Qwen3-235B-A22B's hidden size 4096
   in bf16: peak extra memory, forward-only and forward + backward speed ratios.

The run passes only when every stage does: finite losses and grad norms in the RL steps, the
parity checks, the resume, TE's build (or ``--device cpu``).

Run: ``tools/gpu_smoke.sh [WHEEL_DIR]`` (installs what does not import from carried wheels), or
``python tools/gpu_smoke.py --out DIR``. ``--device cpu`` is a dry run of the same stages on
CPU at toy sizes, float32 (``tests/test_gpu_smoke.py`` runs it, also in a bare environment),
which checks the plumbing, not the GPU.

Every stage's time limit is cut to what is left of ``--limit`` (less a reserve for the summary),
so the last line always prints: it starts with ``GPU_SMOKE`` and holds ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny_rl.yaml"  # the RL demo without its cold start
BENCH = ROOT / "benchmarks" / "bench_logprobs.py"

# The check is relative to how much the log-probs vary over tokens:
# rel = ||gpu - cpu|| / ||cpu - mean(cpu)||. bf16 keeps 8 significant bits (step 2^-8). At the
# demo model's init (std 0.02) the log-probs hardly vary (std 0.15) and routes barely matter, so
# the runs here widen the init to std 0.1 (``INIT_STD``). Measured on CPU with the tiny MoE
# (a bf16 model vs the float32 one with the same bf16-valued weights, 16 synthetic samples,
# random distinct routes; a one-off script, 2026-12-01):
#   init 0.02: bf16 rel 0.004, max |diff| 0.002; every route shifted to the next expert: rel 0.034
#   init 0.10: bf16 rel 0.007, max |diff| 0.024; every route shifted to the next expert: rel 0.34
# The bounds below leave ~7x / ~4x room over the bf16 figures (GPU kernels round differently
# from CPU ones); the guard requires the shifted routes to move rel by more than twice the
# bound, so the measure provably tells wrong routes from bf16 rounding.
INIT_STD = 0.1
LOGPROB_REL_TOL = {"bfloat16": 0.05, "float32": 1e-4}
LOGPROB_MAX_TOL = {"bfloat16": 0.1, "float32": 1e-4}
# Gradients: rel = ||g_gpu - g_cpu|| / ||g_cpu|| over all parameters together, and the worst
# single parameter among those holding at least 1% of the largest parameter gradient norm.
# The dry run in bf16 on CPU (``--device cpu --dtype bfloat16``, the same tiny MoE, init 0.1;
# 2026-12-04) gives total 0.012 and worst 0.016 against float32, and routes shifted to the next
# expert 0.78 total: the bounds leave ~7x / ~9x room for GPU kernels' own rounding and the
# guard (> 2 x the bound) is still 5x below the wrong-routes figure.
GRAD_REL_TOL = {"bfloat16": 0.08, "float32": 1e-4}
GRAD_WORST_TOL = {"bfloat16": 0.15, "float32": 1e-3}
# The memory stage: Qwen3-30B-A3B's widths with 2 layers, one sample of this many tokens.
MEMORY_TOKENS = {"cuda": 4096, "cpu": 64}
SUMMARY_RESERVE_S = 15.0


def _overrides(args, out: Path, steps: int, save_every: int) -> list[str]:
    """The CPU demo config on one device: TP=1, the chosen dtype, R3, packed rows (the CPU
    reference collates padded rows, so the parity check covers the packing too)."""
    ov = [f"run.output_dir={out}", f"run.steps={steps}", f"run.save_every={save_every}",
          "run.tensorboard=false", "run.progress=false", "parallel.tensor_model_parallel_size=1",
          f"model.params_dtype={args.dtype}", f"model.init_method_std={INIT_STD}", "routing.mode=R3",
          "train.layout=packed", f"run.seed={args.seed}"]
    if args.device == "cpu":
        # Toy sizes: the dry run checks the plumbing.
        ov += ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "train.micro_batch_size=2"]
    return ov


def _finite(values) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


# --- stages (each runs in its own process) ----------------------------------------------

def _build_one(args, model_cfg, samples, te: bool) -> dict:
    """One spec's build and forward-only pass; ``te`` picks the layer spec (models/config.py)."""
    import torch

    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.step import build_model_chunks, collate_padded, collect_log_probs

    os.environ["SAPO_MEGATRON_TE"] = "1" if te else "0"
    chunks = build_model_chunks(model_cfg, ParallelConfig(), wrap_ddp=False)
    param = next(chunks[0].parameters())
    rows = collect_log_probs(chunks, [collate_padded(samples)])
    config = chunks[0].config
    experts = {type(m).__name__ for m in chunks[0].modules() if type(m).__name__.endswith("MLP")
               and "expert" in type(m).__module__}
    ok = all(bool(torch.isfinite(r).all()) for r in rows) and param.dtype == getattr(torch, args.dtype)
    if te:  # TE's spec must bring its grouped-GEMM experts, not the local SequentialMLP
        ok = ok and config.moe_grouped_gemm and experts == {"TEGroupedMLP"}
    fusions = [k for k in ("gradient_accumulation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                           "bias_dropout_fusion") if getattr(config, k)]
    return {"status": "ok" if ok else "failed", "device": str(param.device), "experts": sorted(experts),
            "fusions": fusions}


def stage_build(args) -> dict:
    import importlib.util

    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.step.synthetic import synthetic_samples

    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    model_cfg = preset("tiny-moe", params_dtype=args.dtype)
    samples = synthetic_samples(4, vocab_size=model_cfg.vocab_size, seed=0, max_length=16)
    result = {}
    specs = {"local": False}
    if args.device == "cpu":
        result["te"] = "skipped(cpu)"
    elif importlib.util.find_spec("transformer_engine") is None:
        result["te"] = "absent"
    else:
        specs["te"] = True
    for name, te in specs.items():
        try:
            one = _build_one(args, model_cfg, samples, te)
            result[name] = one.pop("status")
            result.update({f"{name}_{k}": v for k, v in one.items()})
        except Exception as err:  # reported in the summary, the other spec still runs
            result[name] = f"error({type(err).__name__}: {str(err)[:160]})"
    return result


def _canonical(chunk, attr: str = "data") -> dict:
    """Parameters (or their ``main_grad``) by single-rank local-spec name, float32 CPU."""
    from sapo_megatron.step.sharding import global_name, unwrap

    aliases = ((".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
               (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"))
    inner = unwrap(chunk)
    out = {}
    for name, param in inner.named_parameters():
        full = global_name(inner, name)
        for te, local in aliases:
            if full.endswith(te):
                full = full[: -len(te)] + local
        out[full] = getattr(param, attr).detach().float().cpu().clone()  # main_grad is reused
    return out


def _gradient_pass(chunks, samples, collate, spec) -> dict:
    """One backward of ``spec``'s loss over ``samples`` (R3 replay), no optimizer step."""
    from sapo_megatron.routing import routing_action
    from sapo_megatron.step import assign_step_weights, run_step

    microbatches = assign_step_weights(collate(samples), spec.reduction, norm_length=spec.norm_length)
    with routing_action(chunks, "replay", with_backward=True):
        metrics = run_step(chunks, microbatches, spec)
    return metrics


def stage_rl(args) -> dict:
    """The first step's old log-probs and gradients dumped, then 3 RL steps of the demo config."""
    import torch

    from sapo_megatron.config import load_config
    from sapo_megatron.routing import routing_action
    from sapo_megatron.step import collect_log_probs
    from sapo_megatron.trainer import loop
    from sapo_megatron.trainer.batching import Minibatch

    out = Path(args.out) / "rl"
    cfg = load_config(CONFIG, _overrides(args, out, steps=3, save_every=3))
    trainer = loop.Trainer(cfg)
    # The dump's rollout must not move the prompt stream: train() then samples step 0 anew,
    # exactly as the resumed run below does.
    stream_state = trainer.stream.state_dict()
    _, results, rewards = trainer.rollout()
    aborted = torch.tensor([r.finish_reason == "abort" for r in results])
    advantages = loop.group_advantages(cfg.train.advantage, rewards, cfg.rollout.samples_per_prompt, aborted)
    samples = loop._build_samples(results, advantages, use_routes=True)
    size = cfg.train.micro_batch_size

    def collate(group):
        return trainer._microbatches(
            Minibatch(group, [len(group[i : i + size]) for i in range(0, len(group), size)], None))

    with routing_action(trainer.chunks, "replay", with_backward=False):
        log_probs = collect_log_probs(trainer.chunks, collate(samples), temperature=trainer.spec.temperature)
    # The update's gradient at these weights: old log-probs from the pass above, so ratios
    # start at 1 as in the trainer's first update; the CPU side reuses these old log-probs.
    # Advantages alternate +1 / -1 (both of SAPO's temperatures): a fresh model's rewards are
    # often all equal within a group, which would make the gradient zero and the check vacuous.
    samples = [dataclasses.replace(s, old_log_probs=lp.to(s.old_log_probs.dtype),
                                   advantages=torch.full_like(s.advantages, 1.0 if i % 2 == 0 else -1.0))
               for i, (s, lp) in enumerate(zip(samples, log_probs))]
    grad_metrics = _gradient_pass(trainer.chunks, samples, collate, trainer.spec)
    dump = Path(args.out) / "first_step.pt"
    torch.save({
        "weights": _canonical(trainer.chunks[0]),
        "grads": _canonical(trainer.chunks[0], "main_grad"),
        "grad_loss": grad_metrics["loss"],
        "samples": [{"tokens": s.tokens, "routes": s.routes, "loss_mask": s.loss_mask, "advantages": s.advantages,
                     "old_log_probs": s.old_log_probs} for s in samples],
        "log_probs": [lp.float().cpu() for lp in log_probs],
        "micro_batch_size": cfg.train.micro_batch_size,
        "spec": dataclasses.asdict(trainer.spec),
        "dtype": args.dtype,
    }, dump)
    trainer.stream.load_state_dict(stream_state)
    t0 = time.perf_counter()
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses, norms = [r.get("loss") for r in rows], [r.get("grad_norm") for r in rows]
    return {"dump": str(dump), "steps": len(rows), "train_s": time.perf_counter() - t0,
            "loss": losses, "grad_norm": norms, "finite": _finite(losses) and _finite(norms),
            "reward_mean": [r.get("reward_mean") for r in rows],
            "routing_coverage": [r.get("routing/coverage") for r in rows],
            "step_s": [r.get("time/step_s") for r in rows],
            "device": str(next(trainer.chunks[0].parameters()).device)}


def stage_cpu_reference(args) -> dict:
    """The dumped first step's log-probs and gradients recomputed on CPU in float32 (R3 replay)."""
    import torch

    from sapo_megatron.config import load_config
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.routing import attach_routes, attach_routing_replay, routing_action
    from sapo_megatron.step import PolicyLossSpec, Sample, build_model_chunks, collate_padded, collect_log_probs
    sys.path.insert(0, str(ROOT))  # the full-tensor loader is a test helper (tests/helpers.py)
    from tests.helpers import load_full_state_dict

    assert not torch.cuda.is_available(), "the reference stage runs with CUDA hidden"
    dump = torch.load(Path(args.out) / "first_step.pt", weights_only=False)
    cfg = load_config(CONFIG, _overrides(args, Path(args.out) / "ref", steps=1, save_every=1)
                      + ["model.params_dtype=float32"])
    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    model_cfg = cfg.model.resolve()
    chunks = build_model_chunks(model_cfg, ParallelConfig())
    load_full_state_dict(chunks[0], dump["weights"])
    attach_routing_replay(chunks[0], model_cfg.moe_layer_pattern())
    samples = [Sample(**s) for s in dump["samples"]]
    spec = PolicyLossSpec(**dump["spec"])
    size = dump["micro_batch_size"]

    def shifted(shift: int) -> list:
        if not shift:
            return samples
        return [dataclasses.replace(s, routes=((s.routes.long() + shift) % model_cfg.num_experts).to(s.routes.dtype))
                for s in samples]

    def collate(group):
        return [attach_routes(collate_padded(group[i : i + size]), group[i : i + size])
                for i in range(0, len(group), size)]

    def log_probs(shift: int):
        with routing_action(chunks, "replay", with_backward=False):
            rows = collect_log_probs(chunks, collate(shifted(shift)), temperature=spec.temperature)
        return torch.cat([lp.double() for lp in rows])

    def grads(shift: int) -> dict:
        _gradient_pass(chunks, shifted(shift), collate, spec)
        return _canonical(chunks[0], "main_grad")

    dtype = dump["dtype"]
    cpu = log_probs(0)
    gpu = torch.cat([lp.double() for lp in dump["log_probs"]])
    spread = (cpu - cpu.mean()).norm()
    rel, guard = float((gpu - cpu).norm() / spread), float((log_probs(1) - cpu).norm() / spread)
    diff = (gpu - cpu).abs()
    lp_ok = rel <= LOGPROB_REL_TOL[dtype] and float(diff.max()) <= LOGPROB_MAX_TOL[dtype]
    lp_ok = lp_ok and guard > 2 * LOGPROB_REL_TOL[dtype] and guard > rel

    want = grads(0)
    grad = grad_parity(dump["grads"], want)
    grad_guard = grad_parity(grads(1), want)["relative"]
    grad_ok = (grad["relative"] <= GRAD_REL_TOL[dtype] and grad["worst"] <= GRAD_WORST_TOL[dtype]
               and grad_guard > 2 * GRAD_REL_TOL[dtype])
    return {"tokens": int(cpu.numel()), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "relative": rel, "wrong_routes_relative": guard, "logprob_ok": bool(lp_ok),
            "grad_relative": grad["relative"], "grad_worst": grad["worst"], "grad_worst_param": grad["worst_param"],
            "grad_wrong_routes_relative": grad_guard, "grad_ok": bool(grad_ok), "ok": bool(lp_ok and grad_ok)}


def grad_parity(got: dict, want: dict) -> dict:
    """Relative gradient gap over all parameters, and the worst parameter's (see GRAD_*_TOL)."""
    import torch

    if set(got) != set(want):
        raise ValueError(f"gradient names differ: only in one side {sorted(set(got) ^ set(want))[:5]}")
    norms = {k: float(want[k].double().norm()) for k in want}
    total = math.sqrt(sum(n * n for n in norms.values()))
    if total == 0.0:
        raise ValueError("the reference gradient is zero: the parity check would be vacuous")
    gap = math.sqrt(sum(float((got[k].double() - want[k].double()).norm()) ** 2 for k in want))
    big = [k for k in want if norms[k] >= 0.01 * max(norms.values())]
    per = {k: float((got[k].double() - want[k].double()).norm()) / norms[k] for k in big}
    worst = max(per, key=per.get)
    return {"relative": gap / total, "worst": per[worst], "worst_param": worst,
            "finite": all(bool(torch.isfinite(g).all()) for g in got.values())}


def stage_memory(args) -> dict:
    """The allocator's peak for a 2-layer slice of Qwen3-30B-A3B at its real widths, one GPU."""
    import torch

    from sapo_megatron.models import ParallelConfig, preset
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.step import (PolicyLossSpec, assign_step_weights, build_model_chunks, build_optimizer,
                                    collate_padded, run_step, sync_params)
    from sapo_megatron.step.synthetic import synthetic_samples

    cuda = args.device == "cuda"
    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    model_cfg = preset("qwen3-30b-a3b" if cuda else "tiny-moe", num_hidden_layers=2, params_dtype=args.dtype)
    tokens = MEMORY_TOKENS[args.device]

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0

    chunks = build_model_chunks(model_cfg, ParallelConfig(), use_distributed_optimizer=True)
    after_build = peak()
    optimizer = build_optimizer(chunks, lr=1e-6, megatron={"use_distributed_optimizer": True})
    samples = synthetic_samples(1, vocab_size=model_cfg.vocab_size, seed=0, min_length=tokens, max_length=tokens)
    spec = PolicyLossSpec(type="sapo")
    microbatches = assign_step_weights([collate_padded(samples)], spec.reduction)
    times, metrics = [], {}
    for _ in range(2):  # the first step creates Adam's moments; the second is the steady state
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = run_step(chunks, microbatches, spec, optimizer=optimizer)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sync_params(chunks)  # what the trainer does before a weight sync or a checkpoint
    params = sum(p.numel() for c in chunks for p in c.parameters())
    return {"model": "qwen3-30b-a3b" if cuda else "tiny-moe", "layers": 2, "tokens": tokens, "params": params,
            "peak_after_build_bytes": after_build, "peak_bytes": peak(), "step_s": times,
            "loss": metrics.get("loss"), "grad_norm": metrics.get("grad_norm"),
            "finite": _finite([metrics.get("loss"), metrics.get("grad_norm")])}


STAGES = {"build": stage_build, "rl": stage_rl, "cpu-reference": stage_cpu_reference, "memory": stage_memory}


# --- the orchestrator -------------------------------------------------------------------

class Deadline:
    """What is left of the run's limit: every stage gets at most that, less the summary's reserve."""

    def __init__(self, limit_s: float):
        self.end = time.monotonic() + limit_s

    def cap(self, budget_s: float) -> float:
        return max(1.0, min(budget_s, self.end - time.monotonic() - SUMMARY_RESERVE_S))


# A stage is a world of its own: variables of an enclosing torchrun (or of a process that already
# rendezvoused, e.g. a test's) would point it at a port in use.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> tuple[int, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=ROOT)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, text = 124, f"timed out after {timeout:.0f} s\n{_text(err.stdout)}{_text(err.stderr)}"
    log.write_text(f"$ {' '.join(cmd)}\n({time.perf_counter() - t0:.1f} s, exit {code})\n{text}")
    return code, text


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _stage(args, name: str, timeout: float, env: dict | None = None) -> dict:
    out = Path(args.out)
    result_file = out / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    t0 = time.perf_counter()
    code, text = _run(cmd, args.deadline.cap(timeout), out / f"{name}.log", env)
    if code == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        result = {"error": f"exit {code}: {tail[0][:200]}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _train_cli(args, out: Path, steps: int, save_every: int, log: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "sapo_megatron.cli", "train", "--config", str(CONFIG),
           *_overrides(args, out, steps=steps, save_every=save_every)]
    return _run(cmd, args.deadline.cap(STAGE_BUDGET_S["resume"] / 2), log)


def resume_check(args, full_losses) -> dict:
    out = Path(args.out) / "resume"
    t0 = time.perf_counter()
    code, text = _train_cli(args, out, 2, 2, Path(args.out) / "resume_first.log")
    if code:
        return {"error": f"first run exit {code}", "seconds": round(time.perf_counter() - t0, 1)}
    code, text = _train_cli(args, out, 3, 3, Path(args.out) / "resume_second.log")
    if code:
        return {"error": f"resumed run exit {code}", "seconds": round(time.perf_counter() - t0, 1)}
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("step") == 2]
    result = {"resumed_at": int(resumed.group(1)) if resumed else None, "seconds": round(time.perf_counter() - t0, 1)}
    if last and full_losses and len(full_losses) >= 3 and full_losses[2] is not None:
        # On CPU the resumed step is bit-identical to the uninterrupted run; on a GPU, bf16
        # atomics make the two runs drift a little, so the gap is reported, not bounded.
        result["loss_gap"] = abs(last[-1]["loss"] - full_losses[2])
    result["ok"] = result["resumed_at"] == 2 and bool(last) and _finite([last[-1].get("loss")] if last else [])
    if args.device == "cpu" and "loss_gap" in result:
        result["ok"] = result["ok"] and result["loss_gap"] == 0.0
    return result


def bench(args) -> dict:
    if args.device == "cpu":
        size = ["--vocab", "1024", "--tokens", "64", "--repeats", "1", "--hidden", "32"]
    else:
        size = ["--vocab", "151936", "--tokens", "8192", "--repeats", "3", "--device", "cuda", "--hidden", "4096"]
    cmd = [sys.executable, str(BENCH), *size, "--dtype", "bfloat16", "--mode", "both"]
    t0 = time.perf_counter()
    code, text = _run(cmd, args.deadline.cap(STAGE_BUDGET_S["bench"]), Path(args.out) / "bench.log")
    last = [line for line in text.splitlines() if line.startswith("peak_mem_ratio=")]
    fused = [line for line in text.splitlines() if line.startswith("fused_mem_ratio=")]
    result = {"seconds": round(time.perf_counter() - t0, 1)}
    if code or not last or not fused:
        result["error"] = f"exit {code}"
        return result
    for line in (last[-1], fused[-1]):
        result.update({k: float(v) for k, v in (item.split("=") for item in line.split())})
    return result


# Seconds each stage may take at most; they add up to less than the default --limit less the
# summary's reserve, and each is also cut to what is left of --limit. On an H200
# (docs/performance.md) the stages took 19, 26, 16, 49, 20 and 13 s; the bench has since gained
# the fused vs unfused comparison (two more subprocesses), hence its larger share.
STAGE_BUDGET_S = {"build": 60, "rl": 110, "cpu-reference": 80, "resume": 120, "memory": 80, "bench": 74}
DEFAULT_LIMIT_S = 540.0


def passed(results: dict, device: str) -> bool:
    """Every stage passed; without TE on a GPU the run fails (TE's spec is what GPUs run)."""
    b, rl, ref, res, mem, bn = (results.get(k, {}) for k in
                                ("build", "rl", "cpu-reference", "resume", "memory", "bench"))
    te_ok = b.get("te") == "ok" or (device == "cpu" and b.get("te") == "skipped(cpu)")
    return (b.get("local") == "ok" and te_ok and rl.get("steps") == 3 and rl.get("finite") is True
            and ref.get("ok") is True and res.get("ok") is True and mem.get("finite") is True
            and "error" not in bn)


def summary(results: dict, total_s: float) -> str:
    b, rl, ref, res, mem, bn = (results.get(k, {}) for k in
                                ("build", "rl", "cpu-reference", "resume", "memory", "bench"))
    fields = {
        "device": results["device"],
        "mcore": results.get("mcore"),
        "torch": results.get("torch"),
        "build_local": b.get("local", b.get("error")),
        "build_te": b.get("te", b.get("error")),
        "rl_steps": rl.get("steps", rl.get("error")),
        "rl_finite": rl.get("finite"),
        "logprob_max_abs": _fmt(ref.get("max_abs")),
        "logprob_rel": _fmt(ref.get("relative")),
        "logprob_rel_wrong_routes": _fmt(ref.get("wrong_routes_relative")),
        "logprob_ok": ref.get("logprob_ok", ref.get("error")),
        "grad_rel": _fmt(ref.get("grad_relative")),
        "grad_worst": _fmt(ref.get("grad_worst")),
        "grad_rel_wrong_routes": _fmt(ref.get("grad_wrong_routes_relative")),
        "grad_ok": ref.get("grad_ok", ref.get("error")),
        "resume": res.get("ok", res.get("error")),
        "resume_loss_gap": _fmt(res.get("loss_gap")),
        "mem_peak_gb": _fmt(mem["peak_bytes"] / 2**30) if "peak_bytes" in mem else mem.get("error"),
        "mem_step_s": _fmt(mem["step_s"][-1]) if "step_s" in mem else "na",
        "bench_ms": _fmt(bn.get("ours_ms")),
        "hbm_floor_ms": _fmt(bn.get("hbm_floor_ms")),
        "floor_ratio": _fmt(bn.get("floor_ratio")),
        "bench_speed_vs_naive": _fmt(bn.get("speed_ratio")),
        "fused_mem_ratio": _fmt(bn.get("fused_mem_ratio")),
        "fused_fwd_speed_ratio": _fmt(bn.get("fused_fwd_speed_ratio")),
        "fused_speed_ratio": _fmt(bn.get("fused_speed_ratio")),
        "total_s": f"{total_s:.0f}",
    }
    ok = passed(results, "cpu" if results["device"] == "cpu" else "cuda")
    text = " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in fields.items())
    return f"GPU_SMOKE ok={int(ok)} {text}"


def _fmt(value) -> str:
    return "na" if value is None else f"{value:.4g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_smoke", help="where logs, dumps and runs go")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run at toy sizes")
    ap.add_argument("--dtype", default=None, help="params dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=DEFAULT_LIMIT_S,
                    help="seconds for the whole run; stages are cut short so that the summary prints")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.stage:
        import warnings

        warnings.filterwarnings("ignore")
        result = STAGES[args.stage](args)
        (out / f"{args.stage}.json").write_text(json.dumps(result))
        return 0

    args.deadline = Deadline(args.limit)
    for stale in ("rl", "ref", "resume"):  # a rerun into the same --out must not resume old runs
        shutil.rmtree(out / stale, ignore_errors=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU_SMOKE ok=0 error=no_CUDA_device (use --device cpu for a dry run)")
        return 1
    t0 = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__}
    try:
        from sapo_megatron.mcore.version import check_megatron_core

        results["mcore"] = check_megatron_core()
    except ImportError as err:
        print(f"GPU_SMOKE ok=0 error={str(err).replace(' ', '_')}")
        return 1
    for name in ("build", "rl", "cpu-reference", "resume", "memory", "bench"):
        if name == "resume":
            results[name] = resume_check(args, results["rl"].get("loss"))
        elif name == "bench":
            results[name] = bench(args)
        else:
            env = _env({"CUDA_VISIBLE_DEVICES": ""}) if name == "cpu-reference" else None
            results[name] = _stage(args, name, STAGE_BUDGET_S[name], env=env)
        print(f"{name}:", json.dumps(results[name]), flush=True)
    line = summary(results, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(line, flush=True)
    return 0 if line.startswith("GPU_SMOKE ok=1") else 1


if __name__ == "__main__":
    sys.exit(main())
