"""``sapo-megatron config show|validate``: print a resolved config, or check it, building nothing.

The work is ``sapo_megatron.config.__main__.run_config_command(argv)``, called with
``["show" | "validate", *rest]``. ``--help`` is answered here from :func:`action_parser`
(the options both sides take: ``--config``, ``--world-size``, overrides), because importing
``sapo_megatron.config`` to ask it costs seconds (it checks against Megatron's config classes);
an option added there belongs in :func:`action_parser` too. Where that function
does not exist (older ``sapo_megatron.config``), the fallback below runs the same checks through
the module's ``main``: ``show`` prints the resolved, redacted YAML (and the batch plan with
``--world-size``), ``validate`` prints only ``ok`` (and the plan) or the error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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


def _fallback(argv: list[str], prog: str) -> int:
    """The same checks through ``python -m sapo_megatron.config``'s ``main``."""
    action, rest = argv[0], argv[1:]
    action_parser(action, prog).parse_intermixed_args(rest)  # --help, and clear errors for bad options
    from sapo_megatron.config.__main__ import main as config_main

    if action == "show":
        return config_main(rest)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = config_main(rest)
    if code == 0:
        print("ok")
        for line in out.getvalue().splitlines():
            if line.startswith("# batch plan:"):
                print(line)
    return code


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "sapo-megatron config"
    if not argv or argv[0] not in ACTIONS:
        build_parser(prog).parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    if "-h" in argv[1:] or "--help" in argv[1:]:
        action_parser(argv[0], prog).parse_args(["--help"])  # exits 0
    from sapo_megatron.config import __main__ as config_main_module

    run = getattr(config_main_module, "run_config_command", None)
    if run is None:
        return _fallback(argv, prog)
    return run(argv)
