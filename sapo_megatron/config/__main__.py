"""``python -m sapo_megatron.config show|validate [--config X] [--world-size N] [key=value ...]``
(see ``commands.py``). Without ``show`` / ``validate`` it shows, as it always did."""

from __future__ import annotations

import sys

from sapo_megatron.config.commands import run_config_command


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("show", "validate", "-h", "--help"):
        argv = ["show", *argv]
    return run_config_command(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
