#!/usr/bin/env python
"""Convert checkpoints between Hugging Face safetensors and sapo_megatron's Megatron-Core format.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen3-30B-A3B/ --out ckpt/
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/ --out hf_out/ [--dtype bfloat16]

One layer is in memory at a time. The HF config.json travels inside the Megatron checkpoint,
so ``mcore-to-hf`` needs nothing else. Supported architectures: see docs/checkpoint.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> sapo_megatron checkpoint")
    h2m.add_argument("--hf-dir", required=True)
    h2m.add_argument("--out", required=True)
    m2h = sub.add_parser("mcore-to-hf", help="sapo_megatron checkpoint -> HF safetensors directory")
    m2h.add_argument("--ckpt", required=True)
    m2h.add_argument("--out", required=True)
    m2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast on export (default: keep)")
    m2h.add_argument("--max-shard-gb", type=float, default=4.0)
    for p in (h2m, m2h):
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from sapo_megatron.checkpoint import hf_to_mcore, mcore_to_hf

    try:
        if args.command == "hf-to-mcore":
            stats = hf_to_mcore(args.hf_dir, args.out, show_progress=not args.no_progress)
        else:
            stats = mcore_to_hf(
                args.ckpt,
                args.out,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                show_progress=not args.no_progress,
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mb = stats["bytes"] / 1e6
    print(f"{args.command}: {mb:.1f} MB in {stats['seconds']:.2f} s ({mb / max(stats['seconds'], 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
