"""``sapo-megatron doctor``: how far do this trainer and this inference server disagree, before a run.

    sapo-megatron doctor --url http://gpu0:30000 --hf-dir Qwen3-30B-A3B/ --prompts train.jsonl
    sapo-megatron doctor --url http://gpu0:30000 --ckpt ckpt/ --tokenizer Qwen3-30B-A3B/ --json
    torchrun --nproc_per_node=8 -m sapo_megatron.cli doctor --config configs/qwen3_30b_a3b_sapo.yaml \\
        --url http://gpu0:30000 --out runs/doctor                 # the training layout (TP/PP/EP)

It samples ``--num-prompts x --samples`` responses from the server (with their routes), runs the
trainer's forward on the same tokens replaying the server's routes and routing live
(``sapo_megatron/doctor/measure.py``: a Trainer built from the config, nothing pushed to the
server), and prints the report of ``sapo_megatron/doctor/report.py`` (its docstring has the
verdict thresholds): routing agreement per MoE layer, the share of tokens routed differently in
>= 1 layer, the |train - rollout| log-prob gap overall and by response position, the tokens SAPO's
gate would half-silence and a GRPO clip of 0.2/0.28 would clip at ratio = exp(gap), a verdict.

Without ``--config`` the run's config is built from the options (one process: TP=PP=EP=1, the
``math`` task on ``--prompts``, a GSM8K-format jsonl; default: made-up sums). With ``--config``
the run's own config is used (its model, layout, task, loss taus, SGLang keys); the options
given override it. The doctor always asks for routes (routing.mode=R3 on the trainer's side) and
reports the headline figures of the config's routing mode. ``--nproc N`` launches torchrun itself.

``--out D`` keeps ``D/doctor.json`` (the ``--json`` object), ``D/doctor_positions.jsonl``
(``sapo-megatron plot D/doctor_positions.jsonl --out D/plots``) and ``D/rollouts.pt``: the
rollouts measured, which ``--rollouts D/rollouts.pt`` (no server) or a training run's
``rollout.engine=recorded rollout.recorded_path=D/rollouts.pt`` measure again on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EPILOG = """examples:
  sapo-megatron doctor --url http://gpu0:30000 --hf-dir Qwen3-30B-A3B/ --prompts train.jsonl
  sapo-megatron doctor --url http://gpu0:30000 --hf-dir Qwen3-30B-A3B/ --json --out runs/doctor
  sapo-megatron doctor --config configs/qwen3_30b_a3b_sapo.yaml --url http://gpu0:30000 --nproc 8
  sapo-megatron plot runs/doctor/doctor_positions.jsonl --out runs/doctor/plots

Run it for a new model, a new SGLang version or FP8 rollouts, before spending GPU hours.
The server must run with --enable-return-routed-experts (docs/sglang.md)."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Measure the train/inference mismatch between the trainer "
                                 "and a live SGLang server.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="the SGLang server (required unless --rollouts or --config has rollout.sglang.urls)")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--hf-dir", help="HF checkpoint of the served weights (converted as the trainer does)")
    weights.add_argument("--ckpt", help="our checkpoint (convert hf-to-mcore output, or a Megatron dist checkpoint)")
    ap.add_argument("--config", help="the run's YAML config (model, layout, task, loss); the options override it")
    ap.add_argument("--tokenizer", help="tokenizer dir for the prompts (default: --hf-dir)")
    ap.add_argument("--prompts", help="GSM8K-format jsonl (question, answer) for the math task (default: made-up sums)")
    ap.add_argument("--num-prompts", type=int, help="prompts to sample (default 8, or the config's prompts_per_step)")
    ap.add_argument("--samples", type=int, help="responses per prompt (default 4, or the config's)")
    ap.add_argument("--max-new-tokens", type=int, help="default 64, or the config's")
    ap.add_argument("--temperature", type=float, help="sampling and log-prob temperature (default 1.0, or the config's)")
    ap.add_argument("--seed", type=int, help="sampling seed (run.seed)")
    ap.add_argument("--api-key-env", help="env var NAME holding the server's API key (never the key itself)")
    ap.add_argument("--rollouts", help="measure these recorded rollouts (a doctor's --out D/rollouts.pt) instead "
                                       "of sampling")
    ap.add_argument("--out", help="directory for doctor.json, doctor_positions.jsonl (plot) and rollouts.pt")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    ap.add_argument("--nproc", type=int, default=1, help="ranks: > 1 launches torchrun (the config's layout)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides (e.g. parallel.tensor_model_parallel_size=2)")
    return ap


def base_config(args, out: Path) -> dict:
    """The config without ``--config``: one process, the math task, the weights given."""
    tokenizer = args.tokenizer or args.hf_dir
    if tokenizer is None:
        raise ValueError("--ckpt without --config needs --tokenizer DIR (the served model's tokenizer)")
    prompts = args.prompts or str(write_default_prompts(out / "prompts.jsonl"))
    return {
        "model": {"preset": None},
        "rollout": {"engine": "sglang", "prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 64},
        "train": {"micro_batch_size": 4},
        "task": {"name": "math", "path": prompts, "format": "gsm8k",
                 "options": {"tokenizer": tokenizer, "verifier": "regex"}},
    }


def write_default_prompts(path: Path, n: int = 32) -> Path:
    """Made-up sums in GSM8K format, for a smoke check when no prompt set is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 + 7 * i, 11 + i
            f.write(json.dumps({"question": f"what is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
                    + "\n")
    return path


def architecture_dir(ckpt: str, out: Path) -> Path:
    """A directory holding our checkpoint's HF ``config.json`` (the trainer reads the architecture from
    ``model.hf_dir``; the weights still come from ``model.ckpt_dir``)."""
    from sapo_megatron.checkpoint import McoreCheckpoint
    from sapo_megatron.trainer.checkpoint import is_dist_checkpoint

    if is_dist_checkpoint(ckpt):
        raise ValueError(f"--ckpt {ckpt} is a Megatron dist checkpoint, which holds no HF config: give --config "
                         f"with model.hf_dir (the architecture) and model.ckpt_dir")
    directory = out / "ckpt_architecture"
    directory.mkdir(parents=True, exist_ok=True)
    staged = directory / f"config.json.{os.getpid()}"
    staged.write_text(json.dumps(McoreCheckpoint(ckpt).hf_config))
    os.replace(staged, directory / "config.json")  # every rank writes the same file
    return directory


def forced(args, out: Path, *, routes: bool = True) -> dict:
    """What the doctor sets whatever the config says: one step, no resume, no reference model,
    the trainer's own log-probs, routes asked (R3; ``routes=False`` keeps the config's mode),
    synchronous sampling, nothing logged outside ``out``."""
    data = {
        "run": {"output_dir": str(out / "run"), "steps": 1, "resume": False, "tensorboard": False,
                "wandb_project": None, "progress": False, "save_every": 0},
        "routing": {"mode": "R3"} if routes else {},
        "train": {"use_reference_model": False, "use_rollout_log_probs": False, "cold_start_steps": 0},
        "rollout": {"max_staleness": 0, "dynamic_sampling": {"filter": None}},
    }
    model = data.setdefault("model", {})
    if args.hf_dir:
        model.update(preset=None, hf_dir=str(args.hf_dir), ckpt_dir=None)
    if args.ckpt:
        model.update(preset=None, ckpt_dir=str(args.ckpt), hf_dir=str(architecture_dir(args.ckpt, out)))
    rollout = data["rollout"]
    for key, value in (("prompts_per_step", args.num_prompts), ("samples_per_prompt", args.samples),
                       ("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature)):
        if value is not None:
            rollout[key] = value
    if args.temperature is not None:
        data["loss"] = {"temperature": args.temperature}
    if args.seed is not None:
        data["run"]["seed"] = args.seed
    sglang = rollout.setdefault("sglang", {})
    if args.url:
        rollout["engine"] = "sglang"
        sglang["urls"] = [args.url]
    if args.api_key_env:
        sglang["api_key_env"] = args.api_key_env
    if args.rollouts:
        rollout.update(engine="recorded", recorded_path=str(args.rollouts))
    return data


def load_doctor_config(args, out: Path):
    """(the trainer's config, the routing mode the run trains with): defaults < ``--config`` (or
    the options' base config) < the user's ``key=value`` overrides < the doctor's own settings."""
    import yaml

    from sapo_megatron.config import load_config

    if not (args.url or args.rollouts or args.config):
        raise ValueError("no server: give --url URL (or rollout.sglang.urls in --config), or --rollouts FILE")
    if args.config:
        path, temporary = args.config, None
    else:
        if not (args.hf_dir or args.ckpt):
            raise ValueError("give the served weights: --hf-dir DIR or --ckpt DIR (or --config with model.hf_dir)")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(base_config(args, out), f)
        path = temporary = f.name
    try:
        user_mode = load_config(path, [*args.overrides, *_flat_overrides(forced(args, out, routes=False))]).routing.mode
        cfg = load_config(path, [*args.overrides, *_flat_overrides(forced(args, out))])
    finally:
        if temporary:
            os.unlink(temporary)
    if cfg.rollout.engine == "embedded":
        raise ValueError("the doctor measures a server: give --url URL (or rollout.engine=sglang in --config), "
                         "or --rollouts FILE")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang.urls:
        raise ValueError("no server: give --url URL (or rollout.sglang.urls in --config), or --rollouts FILE")
    return cfg, user_mode


def _flat_overrides(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _flat_overrides(value, name + ".")
        elif not isinstance(value, dict):
            out.append(f"{name}={json.dumps(value)}")
    return out


def run(args, prog: str = "sapo-megatron doctor") -> int:
    from sapo_megatron.config import ConfigError, validate_for_world

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sapo-doctor-"))
    try:
        cfg, user_mode = load_doctor_config(args, out)
        validate_for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    from sapo_megatron.doctor.measure import measure
    from sapo_megatron.doctor.report import plot_rows, render, to_json
    from sapo_megatron.parallel import destroy
    from sapo_megatron.trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        report = measure(trainer, routing_mode=user_mode,
                         record_to=None if args.rollouts else out / "rollouts.pt")
    finally:
        trainer.engine.close()
        trainer.logger.close()
        trainer.watchdog.stop()
    if report is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "doctor.json").write_text(to_json(report, indent=2))
        with open(out / "doctor_positions.jsonl", "w") as f:
            for row in plot_rows(report):
                f.write(to_json(row) + "\n")
        print(to_json(report) if args.json else render(report), flush=True)
    destroy()
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "RANK" not in os.environ:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "sapo_megatron.cli", "doctor", *(argv if argv is not None else sys.argv[2:])]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.call(cmd, env=env)
    return run(args, parser.prog)
