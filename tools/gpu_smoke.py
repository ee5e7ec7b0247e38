"""GPU smoke run: the first things to try on ONE NVIDIA GPU, in a few minutes, one summary line.

Stages, each in its own process (a failure is reported, the next stage still runs):

1. ``build``: the tiny MoE ``GPTModel`` with the local spec, and with the Transformer Engine
   spec when TE imports, in bf16 on the GPU; one forward-only log-prob pass each.
2. ``rl``: the CPU demo's RL config (``tests/configs/tiny_rl.yaml``, TP=1 on one GPU, bf16, R3) for 3 RL
   steps through the trainer. Before them, the first step's old-log-prob pass (R3 replay of the
   embedded engine's routes) is dumped with the weights and samples.
3. ``cpu-reference`` (``CUDA_VISIBLE_DEVICES=""``): the same pass on CPU in float32, from the
   dumped (bf16-valued) weights and routes; its log-probs must match the GPU's within bf16
   tolerance.
4. ``resume``: ``sapo-megatron train`` for 2 steps with ``run.save_every=2``, then again to 3
   steps from the checkpoint (the trainer's own save/resume, whatever format it writes).
5. ``bench``: ``benchmarks/bench_logprobs.py`` at vocab 151936 x 8192 tokens in bf16 against
   the HBM floor (bytes it must move / 4.0 TB/s).

Run: ``tools/gpu_smoke.sh [WHEEL_DIR]`` (installs megatron-core from wheels if missing), or
``python tools/gpu_smoke.py --out DIR``. ``--device cpu`` is a dry run of the same stages on
CPU at toy sizes, float32 (``tests/test_gpu_smoke.py`` runs it), which checks the plumbing,
not the GPU.

The last line printed starts with ``GPU_SMOKE`` and holds ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def _overrides(args, out: Path, steps: int, save_every: int) -> list[str]:
    """The CPU demo config on one device: TP=1, the chosen dtype, R3."""
    ov = [f"run.output_dir={out}", f"run.steps={steps}", f"run.save_every={save_every}",
          "run.tensorboard=false", "run.progress=false", "parallel.tensor_model_parallel_size=1",
          f"model.params_dtype={args.dtype}", f"model.init_method_std={INIT_STD}", "routing.mode=R3",
          f"run.seed={args.seed}"]
    if args.device == "cpu":
        # Toy sizes: the dry run checks the plumbing.
        ov += ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "train.micro_batch_size=2"]
    return ov


# --- stages (each runs in its own process) ----------------------------------------------

def stage_build(args) -> dict:
    import torch

    from sapo_megatron.models import ParallelConfig, builder, preset
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.step import build_model_chunks, collate_padded, collect_log_probs
    from sapo_megatron.step.synthetic import synthetic_samples

    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    model_cfg = preset("tiny-moe", params_dtype=args.dtype)
    samples = synthetic_samples(4, vocab_size=model_cfg.vocab_size, seed=0, max_length=16)
    result = {}
    te = builder.use_transformer_engine()
    specs = {"local": False, "te": True} if te else {"local": False}
    if not te:
        result["te"] = "skipped(no TE)" if args.device != "cpu" else "skipped(cpu)"
    original = builder.use_transformer_engine
    for name, use_te in specs.items():
        builder.use_transformer_engine = lambda use_te=use_te: use_te
        try:
            chunks = build_model_chunks(model_cfg, ParallelConfig(), wrap_ddp=False)
            param = next(chunks[0].parameters())
            rows = collect_log_probs(chunks, [collate_padded(samples)])
            finite = all(bool(torch.isfinite(r).all()) for r in rows)
            result[name] = "ok" if finite and param.dtype == getattr(torch, args.dtype) else "nonfinite"
            result[f"{name}_device"] = str(param.device)
        except Exception as err:  # reported in the summary, the other spec still runs
            result[name] = f"error({type(err).__name__}: {str(err)[:160]})"
        finally:
            builder.use_transformer_engine = original
    return result


def _canonical_weights(chunk) -> dict:
    """Parameters by single-rank local-spec name (TE's fused norm names mapped), float32 CPU."""
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
        out[full] = param.detach().float().cpu()
    return out


def stage_rl(args) -> dict:
    """The first step's old log-probs dumped, then 3 RL steps of the demo config."""
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
    trainer._step_max_len = max(s.tokens.numel() for s in samples)
    size = cfg.train.micro_batch_size
    microbatches = trainer._microbatches(
        Minibatch(samples, [len(samples[i : i + size]) for i in range(0, len(samples), size)], None))
    with routing_action(trainer.chunks, "replay", with_backward=False):
        log_probs = collect_log_probs(trainer.chunks, microbatches, temperature=trainer.spec.temperature)
    dump = Path(args.out) / "first_step.pt"
    torch.save({
        "weights": _canonical_weights(trainer.chunks[0]),
        "samples": [{"tokens": s.tokens, "routes": s.routes} for s in samples],
        "log_probs": [lp.float().cpu() for lp in log_probs],
        "micro_batch_size": cfg.train.micro_batch_size,
        "temperature": trainer.spec.temperature,
        "dtype": args.dtype,
    }, dump)
    trainer.stream.load_state_dict(stream_state)
    t0 = time.perf_counter()
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"dump": str(dump), "steps": len(rows), "train_s": time.perf_counter() - t0,
            "loss": [r.get("loss") for r in rows], "reward_mean": [r.get("reward_mean") for r in rows],
            "routing_coverage": [r.get("routing/coverage") for r in rows],
            "device": str(next(trainer.chunks[0].parameters()).device)}


def stage_cpu_reference(args) -> dict:
    """The dumped first step's log-probs recomputed on CPU in float32 (R3 replay)."""
    import torch

    from sapo_megatron.config import load_config
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import initialize_model_parallel
    from sapo_megatron.routing import attach_routes, attach_routing_replay, routing_action
    from sapo_megatron.step import Sample, build_model_chunks, collate_padded, collect_log_probs
    sys.path.insert(0, str(ROOT))  # the full-tensor loader is a test helper (tests/helpers.py)
    from tests.helpers import load_full_state_dict

    assert not torch.cuda.is_available(), "the reference stage runs with CUDA hidden"
    dump = torch.load(Path(args.out) / "first_step.pt", weights_only=False)
    cfg = load_config(CONFIG, _overrides(args, Path(args.out) / "ref", steps=1, save_every=1)
                      + ["model.params_dtype=float32"])
    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    model_cfg = cfg.model.resolve()
    chunks = build_model_chunks(model_cfg, ParallelConfig(), wrap_ddp=False)
    load_full_state_dict(chunks[0], dump["weights"])
    attach_routing_replay(chunks[0], model_cfg.moe_layer_pattern())
    samples = []
    for s in dump["samples"]:
        n = s["tokens"].numel()
        zeros = torch.zeros(n - 1)
        samples.append(Sample(tokens=s["tokens"], loss_mask=torch.ones(n - 1, dtype=torch.bool),
                              old_log_probs=zeros, advantages=zeros, routes=s["routes"]))
    size = dump["micro_batch_size"]

    def log_probs(shift: int):
        microbatches = []
        for i in range(0, len(samples), size):
            group = [s if not shift else Sample(
                tokens=s.tokens, loss_mask=s.loss_mask, old_log_probs=s.old_log_probs, advantages=s.advantages,
                routes=((s.routes.long() + shift) % model_cfg.num_experts).to(s.routes.dtype))
                for s in samples[i : i + size]]
            microbatches.append(attach_routes(collate_padded(group), group))
        with routing_action(chunks, "replay", with_backward=False):
            rows = collect_log_probs(chunks, microbatches, temperature=dump["temperature"])
        return torch.cat([lp.double() for lp in rows])

    cpu = log_probs(0)
    gpu = torch.cat([lp.double() for lp in dump["log_probs"]])
    spread = (cpu - cpu.mean()).norm()

    def relative(other):
        return float((other - cpu).norm() / spread)

    dtype = dump["dtype"]
    rel, guard = relative(gpu), relative(log_probs(1))
    diff = (gpu - cpu).abs()
    ok = rel <= LOGPROB_REL_TOL[dtype] and float(diff.max()) <= LOGPROB_MAX_TOL[dtype]
    return {"tokens": int(cpu.numel()), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "relative": rel, "wrong_routes_relative": guard,
            "ok": bool(ok and guard > 2 * LOGPROB_REL_TOL[dtype] and guard > rel)}


STAGES = {"build": stage_build, "rl": stage_rl, "cpu-reference": stage_cpu_reference}


# --- the orchestrator -------------------------------------------------------------------

def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> tuple[int, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=ROOT)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, text = 124, f"timed out after {timeout} s\n{err.stdout or ''}{err.stderr or ''}"
    log.write_text(f"$ {' '.join(cmd)}\n({time.perf_counter() - t0:.1f} s, exit {code})\n{text}")
    return code, text


def _stage(args, name: str, timeout: float, env: dict | None = None) -> dict:
    out = Path(args.out)
    result_file = out / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    t0 = time.perf_counter()
    code, text = _run(cmd, timeout, out / f"{name}.log", env)
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
    return _run(cmd, 300, log)


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
    result["ok"] = result["resumed_at"] == 2 and bool(last)
    if args.device == "cpu" and "loss_gap" in result:
        result["ok"] = result["ok"] and result["loss_gap"] == 0.0
    return result


def bench(args) -> dict:
    if args.device == "cpu":
        size = ["--vocab", "1024", "--tokens", "64", "--repeats", "1"]
    else:
        size = ["--vocab", "151936", "--tokens", "8192", "--repeats", "3", "--device", "cuda"]
    cmd = [sys.executable, str(BENCH), *size, "--dtype", "bfloat16"]
    t0 = time.perf_counter()
    code, text = _run(cmd, 240, Path(args.out) / "bench.log")
    last = [line for line in text.splitlines() if line.startswith("peak_mem_ratio=")]
    result = {"seconds": round(time.perf_counter() - t0, 1)}
    if code or not last:
        result["error"] = f"exit {code}"
        return result
    result.update({k: float(v) for k, v in (item.split("=") for item in last[-1].split())})
    return result


def summary(results: dict, total_s: float) -> str:
    b, rl, ref, res, bn = (results.get(k, {}) for k in ("build", "rl", "cpu-reference", "resume", "bench"))
    fields = {
        "device": results["device"],
        "mcore": results.get("mcore"),
        "build_local": b.get("local", b.get("error")),
        "build_te": b.get("te", b.get("error")),
        "rl_steps": rl.get("steps", rl.get("error")),
        "logprob_max_abs": _fmt(ref.get("max_abs")),
        "logprob_rel": _fmt(ref.get("relative")),
        "logprob_rel_wrong_routes": _fmt(ref.get("wrong_routes_relative")),
        "logprob_ok": ref.get("ok", ref.get("error")),
        "resume": res.get("ok", res.get("error")),
        "resume_loss_gap": _fmt(res.get("loss_gap")),
        "bench_ms": _fmt(bn.get("ours_ms")),
        "hbm_floor_ms": _fmt(bn.get("hbm_floor_ms")),
        "floor_ratio": _fmt(bn.get("floor_ratio")),
        "bench_speed_vs_naive": _fmt(bn.get("speed_ratio")),
        "total_s": f"{total_s:.0f}",
    }
    ok = (b.get("local") == "ok" and b.get("te", "ok") in ("ok", "skipped(no TE)", "skipped(cpu)")
          and rl.get("steps") == 3 and ref.get("ok") is True and res.get("ok") is True and "error" not in bn)
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

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU_SMOKE ok=0 error=no_CUDA_device (use --device cpu for a dry run)")
        return 1
    t0 = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    try:
        from sapo_megatron.mcore.version import check_megatron_core

        results["mcore"] = check_megatron_core()
    except ImportError as err:
        print(f"GPU_SMOKE ok=0 error={str(err).replace(' ', '_')}")
        return 1
    results["build"] = _stage(args, "build", 240)
    print("build:", json.dumps(results["build"]), flush=True)
    results["rl"] = _stage(args, "rl", 420)
    print("rl:", json.dumps(results["rl"]), flush=True)
    results["cpu-reference"] = _stage(args, "cpu-reference", 240, env=_env({"CUDA_VISIBLE_DEVICES": ""}))
    print("cpu-reference:", json.dumps(results["cpu-reference"]), flush=True)
    results["resume"] = resume_check(args, results["rl"].get("loss"))
    print("resume:", json.dumps(results["resume"]), flush=True)
    results["bench"] = bench(args)
    print("bench:", json.dumps(results["bench"]), flush=True)
    line = summary(results, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(line, flush=True)
    return 0 if line.startswith("GPU_SMOKE ok=1") else 1


if __name__ == "__main__":
    sys.exit(main())
