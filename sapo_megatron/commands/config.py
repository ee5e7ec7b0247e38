"""``sapo-megatron config show|validate``: print a resolved config, or check it, building nothing.

The work is ``sapo_megatron.config.commands.run_config_command(argv)``, called with
``["show" | "validate", *rest]``. ``--help`` is answered here from :func:`action_parser`
(the options both sides take: ``--config``, ``--world-size``, overrides), because importing
``sapo_megatron.config`` to ask it costs seconds (it checks against Megatron's config classes);
an option added there belongs in :func:`action_parser` too.
"""

from __future__ import annotations

import argparse
import sys

ACTIONS = {
    "show": "print the resolved config (defaults < YAML < overrides), secrets redacted",
    "validate": "check a config (and the batch plan for --world-size N) without building anything",
}
EPILOG = """examples:
  sapo-megatron config show --config configs/tiny_cpu.yaml loss.tau_neg=1.1
  sapo-megatron config validate --config configs/qwen3_30b_a3b_sapo.yaml --world-size 64

Exit status 2 and a one-line error naming the key when the config is invalid."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Show or validate a run configuration.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True, metavar="{" + ",".join(ACTIONS) + "}")
    for action, help_text in ACTIONS.items():
        sub.add_parser(action, help=help_text, add_help=False)
    return ap


def action_parser(action: str, prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{prog} {action}", description=ACTIONS[action], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/*.yaml); defaults apply without one")
    p.add_argument("--world-size", type=int, help="also check parallel and batch sizes for this many ranks")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (output_dir=, seed= aliases)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "sapo-megatron config"
    if not argv or argv[0] not in ACTIONS:
        build_parser(prog).parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    if "-h" in argv[1:] or "--help" in argv[1:]:
        action_parser(argv[0], prog).parse_args(["--help"])  # exits 0
    from sapo_megatron.config.commands import run_config_command

    return run_config_command(argv)
