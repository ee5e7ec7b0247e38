"""``sapo-megatron plan``: per-rank GPU memory of a config at its real size, on a CPU (sapo_megatron.plan)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  sapo-megatron plan --config configs/qwen3_30b_a3b_sapo.yaml
  sapo-megatron plan --config configs/qwen3_235b_a22b_sapo.yaml --json
  sapo-megatron plan --config configs/qwen3_30b_a3b_sapo.yaml train.micro_batch_size=1 --gpu-memory-gb 141
  sapo-megatron plan --config configs/qwen3_30b_a3b_sapo.yaml --launcher examples/slurm/qwen3_30b_a3b_sapo.sbatch

The world size (and any overrides) come from the shipped launcher of the config (examples/*.sh
first, then examples/slurm/*.sbatch); --world-size or --launcher choose another. Parameter
counts come from a meta-device build of one rank per pipeline stage (a few seconds)."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Predict per-rank GPU memory of a training config.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    ap.add_argument("--gpu-memory-gb", type=float, help="GPU memory in GB (default: what the config's comments state, e.g. 'H100 80 GB'; else 80)")
    ap.add_argument("--world-size", type=int, help="ranks of the trainer (default: the config's launcher)")
    ap.add_argument("--launcher", help="launcher script whose layout to plan (default: the config's first)")
    ap.add_argument("--prompt-tokens", type=int, help="prompt length per sample (default 512)")
    ap.add_argument("--spec", choices=["te", "local"], default="te",
                    help="te: Transformer Engine's layers (GPU clusters); local: Megatron's local spec "
                         "(CPU, or a GPU without TE: unfused attention, torch norms)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap


def main(argv: list[str], prog: str = "sapo-megatron plan") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    from sapo_megatron.config import ConfigError
    from sapo_megatron.plan import DEFAULT_PROMPT_TOKENS, GB, plan_file
    from sapo_megatron.plan.launch import parse_launcher

    kwargs = {"spec": args.spec, "prompt_tokens": args.prompt_tokens or DEFAULT_PROMPT_TOKENS}
    if args.gpu_memory_gb is not None:
        kwargs["gpu_memory_bytes"] = args.gpu_memory_gb * GB
    if args.launcher and not Path(args.launcher).is_file():
        print(f"{prog}: --launcher {args.launcher}: no such file", file=sys.stderr)
        return 2
    launch = parse_launcher(args.launcher) if args.launcher else None
    if args.launcher and launch is None:
        print(f"{prog}: --launcher {args.launcher} launches no training config the planner can read "
              f"(expected a script that passes --config to the trainer, as examples/ and examples/slurm/ do)",
              file=sys.stderr)
        return 2
    try:
        report = plan_file(args.config, args.overrides, world_size=args.world_size, launch=launch, **kwargs)
    except (ConfigError, ValueError, RuntimeError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.table())
    return 0
