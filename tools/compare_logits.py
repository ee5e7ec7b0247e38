#!/usr/bin/env python
"""Converted-checkpoint logits vs HF; the logic is ``sapo_megatron.commands.compare_logits`` (``sapo-megatron compare-logits``).

    python tools/compare_logits.py --hf-dir D --ckpt C [--dump F] [--seq-len 16 --batch 2] [--tol T]
"""

import sys

from sapo_megatron.commands.compare_logits import main

if __name__ == "__main__":
    sys.exit(main())
