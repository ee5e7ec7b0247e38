#!/usr/bin/env python
"""The ablation grid; the logic is ``sapo_megatron.commands.sweep`` (``sapo-megatron sweep``).

    python examples/ablations/sweep.py --out runs/ablations [--dry-run | --report-only] [--seeds 0 1 2]
"""

import sys

from sapo_megatron.commands.sweep import *  # noqa: F401,F403  (ARMS, table, ...: kept importable here)
from sapo_megatron.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
