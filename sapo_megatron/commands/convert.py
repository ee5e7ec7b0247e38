"""``sapo-megatron convert hf-to-mcore|mcore-to-hf``: checkpoint conversion (also ``tools/convert_checkpoint.py``).

The directions are a registry (``DIRECTIONS``: name -> (add its arguments, run it)), so a new
source format (for example a Megatron training checkpoint for ``mcore-to-hf``) is one more
entry or a branch inside one runner, not a change to the parser plumbing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EPILOG = """examples:
  sapo-megatron convert hf-to-mcore --hf-dir Qwen3-30B-A3B/ --out ckpt/
  sapo-megatron convert mcore-to-hf --ckpt ckpt/ --out hf_out/ --dtype bfloat16

One layer is in memory at a time, also when mcore-to-hf reads a training checkpoint. The HF
config.json travels inside the Megatron checkpoint, so mcore-to-hf needs nothing else.
Supported architectures: docs/checkpoint.md."""


def _hf_to_mcore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="HF safetensors directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output sapo_megatron checkpoint directory")


def _hf_to_mcore(args: argparse.Namespace) -> dict:
    from sapo_megatron.checkpoint import hf_to_mcore

    return hf_to_mcore(args.hf_dir, args.out, show_progress=not args.no_progress)


def _mcore_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="sapo_megatron checkpoint (hf-to-mcore output), or a training "
                   "checkpoint (iter_N/, its checkpoints/ parent or the run dir)")
    p.add_argument("--out", required=True, help="output HF safetensors directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast on export (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors shard (default 4)")


def _mcore_to_hf(args: argparse.Namespace) -> dict:
    import torch

    from sapo_megatron.checkpoint import mcore_to_hf

    return mcore_to_hf(
        args.ckpt,
        args.out,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        show_progress=not args.no_progress,
    )


# name -> (help, add arguments, run -> stats with "bytes" and "seconds")
DIRECTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "hf-to-mcore": ("HF safetensors directory -> sapo_megatron checkpoint", _hf_to_mcore_args, _hf_to_mcore),
    "mcore-to-hf": ("sapo_megatron checkpoint -> HF safetensors directory", _mcore_to_hf_args, _mcore_to_hf),
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Convert checkpoints between Hugging Face safetensors "
                                 "and sapo_megatron's Megatron-Core format.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(DIRECTIONS) + "}")
    for name, (help_text, add_args, _) in DIRECTIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        stats = DIRECTIONS[args.command][2](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mb = stats["bytes"] / 1e6
    print(f"{args.command}: {mb:.1f} MB in {stats['seconds']:.2f} s ({mb / max(stats['seconds'], 1e-9):.1f} MB/s)")
    return 0
