"""The ``sapo-megatron`` command: one entry point, argparse subcommands.

    sapo-megatron train --config configs/tiny_cpu.yaml [key.sub=value ...]   # the RL trainer
    sapo-megatron convert hf-to-mcore --hf-dir Qwen3-30B-A3B/ --out ckpt/    # and mcore-to-hf
    sapo-megatron compare-logits --hf-dir Qwen3-30B-A3B/ --ckpt ckpt/ --tol 1e-4
    sapo-megatron plot runs/a/metrics.jsonl --out runs/a/plots
    sapo-megatron config show|validate --config configs/tiny_cpu.yaml [--world-size N]
    sapo-megatron plan --config configs/qwen3_30b_a3b_sapo.yaml [--json] [--gpu-memory-gb 80]
    sapo-megatron sweep --out runs/ablations [--dry-run]
    sapo-megatron doctor --url http://gpu0:30000 --hf-dir Qwen3-30B-A3B/ [--json]  # train/inference mismatch
    sapo-megatron demo [--nproc 2] [--tp 2] [--updates 4]                    # one-batch smoke run

Subcommands are a registry (name -> help and a ``"module:function"`` taking the remaining
arguments); each handler builds its own argparse parser, with an example in its ``--help``
epilog. Handlers are imported only when run, and import torch / Megatron only inside, so
``sapo-megatron --help`` does not pay for them. ``train`` runs in the current process group:
launch it with torchrun for several ranks (``examples/run_tiny_cpu.sh``); ``demo`` starts
torchrun itself when not already under it. ``tools/*.py`` share the handlers' code
(``sapo_megatron.commands``) and keep their old arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

PROG = "sapo-megatron"


@dataclass(frozen=True)
class Command:
    help: str
    target: str  # "module:function", called as function(argv, prog=...) -> int


COMMANDS: dict[str, Command] = {
    "train": Command("run the RL trainer (under torchrun for several ranks)", "sapo_megatron.cli:train"),
    "convert": Command("convert checkpoints: hf-to-mcore | mcore-to-hf", "sapo_megatron.commands.convert:main"),
    "compare-logits": Command("compare a converted checkpoint's logits with HF transformers'",
                              "sapo_megatron.commands.compare_logits:main"),
    "plot": Command("draw training curves from metrics.jsonl files", "sapo_megatron.commands.plot:main"),
    "config": Command("show | validate a run configuration without building anything",
                      "sapo_megatron.commands.config:main"),
    "plan": Command("predict per-rank GPU memory of a config at its real size (on a CPU)",
                    "sapo_megatron.commands.plan:main"),
    "sweep": Command("run the loss / tau / routing-replay ablation grid on the CPU demo",
                     "sapo_megatron.commands.sweep:main"),
    "doctor": Command("measure the train/inference mismatch against a live SGLang server",
                      "sapo_megatron.commands.doctor:main"),
    "demo": Command("one-batch SAPO smoke run of a tiny MoE (starts torchrun)", "sapo_megatron.cli:demo"),
}

EPILOG = """examples:
  sapo-megatron demo                                            # the CPU smoke run, 2 ranks
  sapo-megatron config validate --config configs/tiny_cpu.yaml --world-size 2
  torchrun --nproc_per_node=2 -m sapo_megatron.cli train --config configs/tiny_cpu.yaml seed=1
  sapo-megatron convert hf-to-mcore --hf-dir Qwen3-30B-A3B/ --out ckpt/

Run `sapo-megatron <command> --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; it lists the commands and leaves their options to their handlers."""
    ap = argparse.ArgumentParser(prog=PROG, description="SAPO and routing replay for Megatron-Core RL training.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return ap


def handler(name: str) -> Callable[..., int]:
    module, function = COMMANDS[name].target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; known: {', '.join(COMMANDS)}")  # exits 2
    return handler(argv[0])(argv[1:], prog=f"{PROG} {argv[0]}")


# ---------------------------------------------------------------------------------------------
# train and demo (their logic lives in sapo_megatron.trainer and sapo_megatron.demo)
# ---------------------------------------------------------------------------------------------

TRAIN_EPILOG = """examples:
  sapo-megatron train --config configs/tiny_cpu.yaml loss.tau_neg=1.1         # one process
  torchrun --nproc_per_node=2 -m sapo_megatron.cli train --config configs/tiny_cpu.yaml seed=1
  examples/run_tiny_cpu.sh output_dir=runs/a seed=1                            # the same, 2 ranks

Overrides are key.sub=value (output_dir= and seed= are short for run.output_dir= / run.seed=).
Check a config first with `sapo-megatron config validate --config X --world-size N`."""


def train(argv: list[str], prog: str = f"{PROG} train") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Run the RL trainer in the current process group.",
                                 epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (configs/*.yaml); defaults apply without one")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides (output_dir=, seed= aliases)")
    args = ap.parse_intermixed_args(argv)

    from sapo_megatron.config import ConfigError, load_config, validate_for_world

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate_for_world(cfg, world)
    except (ConfigError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    from sapo_megatron.trainer.loop import train as run_training

    run_training(cfg)
    return 0


def _launch_torchrun(module: str, nproc: int, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def demo(argv: list[str], prog: str = f"{PROG} demo") -> int:
    from sapo_megatron import demo as demo_module

    args = demo_module.build_parser(prog).parse_args(argv)  # --help and bad options, before torchrun
    if "RANK" in os.environ:
        demo_module.main(argv)
        return 0
    if args.nproc < 1:
        print(f"{prog}: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    return _launch_torchrun("sapo_megatron.demo", args.nproc, argv)


if __name__ == "__main__":
    sys.exit(main())
