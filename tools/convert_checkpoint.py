#!/usr/bin/env python
"""HF <-> Megatron-Core conversion; the logic is ``sapo_megatron.commands.convert`` (``sapo-megatron convert``).

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen3-30B-A3B/ --out ckpt/
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/ --out hf_out/ [--dtype bfloat16]
"""

import sys

from sapo_megatron.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
