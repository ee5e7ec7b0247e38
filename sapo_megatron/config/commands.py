"""``config show|validate``: print the resolved config, or check it, without building anything.

    python -m sapo_megatron.config show --config configs/tiny_cpu.yaml --world-size 2 loss.tau_neg=1.1
    python -m sapo_megatron.config validate --config configs/qwen3_30b_a3b_sapo.yaml --world-size 4 \\
        'rollout.sglang.urls=[http://127.0.0.1:30000]'

``show`` prints the YAML a run would save (model fully resolved, ``${oc.env:...}`` unresolved,
secrets redacted) and, with ``--world-size``, the batch plan as a trailing comment. ``validate``
prints one line: ``OK ...`` or the problem. Both exit 2 on an invalid config.
``sapo-megatron config ARGS`` calls :func:`run_config_command` with the same ARGS.
"""

from __future__ import annotations

import argparse
import sys

from sapo_megatron.config.errors import ConfigError
from sapo_megatron.config.io import dump_yaml, load_config
from sapo_megatron.config.validate import validate_for_world

SUMMARY = "Print the resolved config, or check it, without building anything."
EXAMPLE = ("example:\n  sapo-megatron config validate --config configs/tiny_cpu.yaml --world-size 2 "
           "loss.tau_neg=1.1 seed=3")


ACTIONS = {
    "show": "print the resolved config as YAML (env references kept, secrets redacted)",
    "validate": "check the config (and the batch split with --world-size); prints one line",
}


def _parser(action: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"sapo-megatron config {action}", description=ACTIONS[action],
                                 epilog=EXAMPLE.replace("validate", action),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (configs/*.yaml); defaults apply without one")
    ap.add_argument("--world-size", type=int, default=None,
                    help="also check parallel and batch sizes against this many ranks")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="overrides on top of the file (output_dir= and seed= are aliases)")
    return ap


def _usage() -> str:
    lines = ["usage: sapo-megatron config {show,validate} [--config PATH] [--world-size N] [key.sub=value ...]",
             "", SUMMARY, ""]
    lines += [f"  {name:<9} {help_}" for name, help_ in ACTIONS.items()]
    return "\n".join([*lines, "", EXAMPLE])


def run_config_command(argv: list[str]) -> int:
    """``show|validate [--config PATH] [--world-size N] [key.sub=value ...]`` -> exit status
    (0 valid, 2 invalid config or bad arguments)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in ACTIONS:
        print(f"sapo-megatron config: unknown action {argv[0]!r}; expected show or validate\n{_usage()}",
              file=sys.stderr)
        return 2
    action = argv[0]
    try:
        args = _parser(action).parse_intermixed_args(argv[1:])
    except SystemExit as exit_:  # --help, or argparse's own usage error (already printed)
        return int(exit_.code or 0)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = validate_for_world(cfg, args.world_size) if args.world_size is not None else None
    except ConfigError as err:
        print(f"sapo-megatron config {action}: {err}", file=sys.stderr)
        return 2
    if action == "show":
        print(dump_yaml(cfg), end="")
        if plan is not None:
            print(f"# batch plan: {plan}")
    else:
        where = f" for world size {args.world_size}: {plan}" if plan is not None else ""
        print(f"OK: {args.config or 'defaults'} is a valid configuration{where}")
    return 0
