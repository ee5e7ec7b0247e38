"""torchrun worker: load converted checkpoints into a sharded model, compute logits, export back.

Run by tests/test_checkpoint.py, e.g.::

    torchrun --nproc_per_node=2 tests/dist/ckpt_worker.py --tp 2 --out R.pt \\
        --case qwen3_moe HF_DIR CKPT_DIR EXPORT_DIR [--case ...]

For every case: build the model for the HF config at this layout, load it from the
sapo_megatron checkpoint and, separately, straight from the HF directory (both must give the
same shards), compute full-vocab logits on fixed tokens, then export the sharded model to HF
safetensors (EXPORT_DIR/hf) and to a sapo_megatron checkpoint (EXPORT_DIR/ckpt). Rank 0 saves
``{case: {"logits": ..., "input_ids": ...}}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import (  # noqa: E402
    export_hf,
    load_hf_into_model,
    load_into_model,
    save_from_model,
)
from sapo_megatron.checkpoint.parity import (  # noqa: E402
    build_model_for_hf_config,
    mcore_logits,
    random_input_ids,
)
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from sapo_megatron.parallel import destroy  # noqa: E402
from tests.helpers import add_layout_args, init_layout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    add_layout_args(ap)
    ap.add_argument("--case", nargs=4, action="append", metavar=("NAME", "HF", "CKPT", "EXPORT"), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = init_layout(args, seed=1234)
    results = {}
    for name, hf_dir, ckpt_dir, export_dir in args.case:
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        chunks = build_model_for_hf_config(hf_config, parallel)
        load_into_model(chunks, ckpt_dir)
        from_hf = build_model_for_hf_config(hf_config, parallel)
        load_hf_into_model(from_hf, hf_dir)
        for (n, a), (_, b) in zip(unwrap(chunks[0]).state_dict().items(), unwrap(from_hf[0]).state_dict().items()):
            if isinstance(a, torch.Tensor) and not torch.equal(a, b):
                raise AssertionError(f"{name}: {n} differs between checkpoint and direct HF loading")
        input_ids = random_input_ids(hf_config["vocab_size"], batch=2, seq=16, seed=3)
        logits = mcore_logits(chunks, input_ids)
        export_hf(chunks, Path(export_dir) / "hf", hf_config)
        save_from_model(chunks, Path(export_dir) / "ckpt", hf_config)
        results[name] = {"logits": logits, "input_ids": input_ids}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    destroy()


if __name__ == "__main__":
    main()
