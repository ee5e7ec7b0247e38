"""The ``sapo-megatron`` command.

Subcommands are a registry (name -> handler):

    sapo-megatron train --config configs/tiny_cpu.yaml [key.sub=value ...]   # the RL trainer
    sapo-megatron demo [--nproc 2] [--tp 2] [--updates 4]                   # one-batch smoke run

``train`` runs in the current process group: launch it with torchrun for several ranks
(``examples/run_tiny_cpu.sh``). ``demo`` starts torchrun itself when not already under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

COMMANDS: dict[str, Callable[[list[str]], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _launch_torchrun(module: str, nproc: int, argv: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


@command("demo")
def _demo(argv: list[str]) -> int:
    from sapo_megatron import demo

    if "RANK" in os.environ:
        demo.main(argv)
        return 0
    args = demo.parse_args(argv)
    if args.nproc < 1:
        print(f"sapo-megatron demo: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    return _launch_torchrun("sapo_megatron.demo", args.nproc, argv)


@command("train")
def _train(argv: list[str]) -> int:
    """``sapo-megatron train --config X.yaml [key.sub=value ...]``; under torchrun for >1 rank."""
    import argparse

    ap = argparse.ArgumentParser(prog="sapo-megatron train")
    ap.add_argument("--config", help="YAML file (configs/*.yaml); defaults apply without one")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides (output_dir=, seed= aliases)")
    args = ap.parse_args(argv)

    from sapo_megatron.config import ConfigError, load_config, validate_for_world

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate_for_world(cfg, world)
    except (ConfigError, ValueError) as err:
        print(f"sapo-megatron train: {err}", file=sys.stderr)
        return 2
    from sapo_megatron.trainer.loop import train

    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        msg = f"usage: sapo-megatron {{{known}}} [options]"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sapo-megatron: unknown command {argv[0]!r}; known: {known}", file=sys.stderr)
            print(msg, file=sys.stderr)
            return 2
        print(msg)
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
