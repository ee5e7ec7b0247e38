"""torchrun worker: a training checkpoint and a sapo_megatron checkpoint of HF models, at a layout.

Run by tests/test_checkpoint_export.py, e.g.::

    torchrun --nproc_per_node=2 tests/dist/export_worker.py --tp 2 --case HF_DIR OUT_DIR [--case ...]

For every case: build the model for HF_DIR's config at this layout, load the HF weights, write
OUT_DIR/run/checkpoints/iter_0000001 with the trainer's ``save_checkpoint`` (the meta.json
``convert mcore-to-hf`` needs; no optimizer) and OUT_DIR/ckpt with ``save_from_model``, the
latter under a live-tensor tracker: each rank writes the peak bytes it held to
OUT_DIR/save_peak_rank{R}.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import load_hf_into_model, model_config_from_hf, save_from_model  # noqa: E402
from sapo_megatron.checkpoint.parity import build_model_for_hf_config  # noqa: E402
from sapo_megatron.parallel import destroy  # noqa: E402
from sapo_megatron.trainer.checkpoint import save_checkpoint  # noqa: E402
from tests.helpers import LiveTensorBytes, add_layout_args, init_layout  # noqa: E402


def main() -> None:
    ap = add_layout_args(argparse.ArgumentParser())
    ap.add_argument("--case", nargs=2, action="append", metavar=("HF", "OUT"), required=True)
    args = ap.parse_args()
    parallel = init_layout(args, seed=1234)
    for hf_dir, out_dir in args.case:
        out = Path(out_dir)
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        chunks = build_model_for_hf_config(hf_config, parallel)
        load_hf_into_model(chunks, hf_dir)
        meta = {"model_config": dataclasses.asdict(model_config_from_hf(hf_config)), "hf_config": hf_config}
        save_checkpoint(out / "run", 1, chunks, None, meta=meta)
        params = [t for c in chunks for t in c.state_dict().values()]
        with LiveTensorBytes(existing=params) as live:  # what it allocates, not the model's own tensors
            save_from_model(chunks, out / "ckpt", hf_config)
        (out / f"save_peak_rank{dist.get_rank()}.json").write_text(json.dumps({"peak": live.peak}))
    destroy()


if __name__ == "__main__":
    main()
