"""``sapo-megatron compare-logits``: a converted checkpoint's logits vs HF transformers' (also ``tools/compare_logits.py``).

Runs on one process (TP=PP=EP=1, CPU is fine for small models) and prints
``max_abs_diff <value>``. ``--dump F`` writes ``{"input_ids", "hf_logits", "mcore_logits"}``
with ``torch.save``. ``--tol T`` makes the exit status 1 when the difference exceeds T.
Needs ``transformers`` (the ``[test]`` extra).
"""

from __future__ import annotations

import argparse
import warnings

EPILOG = """example:
  sapo-megatron compare-logits --hf-dir Qwen3-30B-A3B/ --ckpt ckpt/ --tol 1e-4 [--dump logits.pt]

Prints max_abs_diff <value> over random tokens; exit status 1 when it exceeds --tol."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Compare the logits of a converted checkpoint "
                                 "(Megatron-Core) with HF transformers' on random tokens.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--ckpt", required=True, help="sapo_megatron checkpoint (hf-to-mcore output)")
    ap.add_argument("--dump", help="torch.save input_ids, hf_logits and mcore_logits here")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, help="exit 1 when max abs diff exceeds this")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from sapo_megatron.checkpoint import McoreCheckpoint, load_into_model
    from sapo_megatron.checkpoint.parity import (
        build_model_for_hf_config,
        hf_logits,
        mcore_logits,
        random_input_ids,
    )
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import destroy, initialize_model_parallel

    hf_config = McoreCheckpoint(args.ckpt).hf_config
    initialize_model_parallel(ParallelConfig())
    chunks = build_model_for_hf_config(hf_config)
    load_into_model(chunks, args.ckpt)
    input_ids = random_input_ids(hf_config["vocab_size"], args.batch, args.seq_len, args.seed)
    got = mcore_logits(chunks, input_ids)
    ref = hf_logits(args.hf_dir, input_ids)
    diff = (got - ref).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    if args.dump:
        torch.save({"input_ids": input_ids, "hf_logits": ref, "mcore_logits": got}, args.dump)
    destroy()
    return 1 if args.tol is not None and diff > args.tol else 0
