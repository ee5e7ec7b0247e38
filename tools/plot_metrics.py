#!/usr/bin/env python
"""Training curves from metrics.jsonl; the logic is ``sapo_megatron.commands.plot`` (``sapo-megatron plot``).

    python tools/plot_metrics.py runs/a/metrics.jsonl [more.jsonl ...] --out DIR [--label ...] [--group-by ...]
"""

import sys

from sapo_megatron.commands.plot import main

if __name__ == "__main__":
    sys.exit(main())
