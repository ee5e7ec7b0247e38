"""torchrun worker: the shard-local delta (``weight_sync/delta_pieces``) rebuilds the export bit for bit.

Run by tests/test_delta_pieces.py::

    torchrun --nproc_per_node=2 tests/dist/delta_pieces_worker.py --tp 2 --hf HF_DIR --out OUT

Builds the model at the layout from HF_DIR, writes the served (bf16) HF export to OUT/base (what
a server holds after a full sync) and keeps this rank's parts (``PieceDiffer.refresh``). Then
changes the parameters as a training step would (per tensor: a few, a tenth, or all elements;
the same change on every rank that holds a replicated tensor), writes this rank's delta file and
the export of the changed model to OUT/new. Rank 0 applies every rank's file to OUT/base with the
SERVER's code (``sapo_sglang.delta_loader``) and writes OUT/result.json: whether that equals
OUT/new bit for bit, the encodings and regions used, and whether the server's region digests equal
the trainer's.
"""

from __future__ import annotations

import argparse
import json
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.checkpoint import load_hf_into_model  # noqa: E402
from sapo_megatron.checkpoint.live import _held_tensors, export_hf, export_plan  # noqa: E402
from sapo_megatron.checkpoint.parity import build_model_for_hf_config  # noqa: E402
from sapo_megatron.parallel import destroy  # noqa: E402
from sapo_megatron.rollout.sglang.weight_sync.delta_pieces import PieceDiffer, local_pieces, write_delta  # noqa: E402
from sapo_sglang import delta_loader as dl  # noqa: E402
from tests.helpers import add_layout_args, init_layout  # noqa: E402

FRACTIONS = (0.002, 0.05, 0.3, 1.0)  # index, gap, bitmap and whole-part encodings all occur


def perturb(model) -> None:
    """A training-like change keyed by each tensor's global name (replicas change alike)."""
    with torch.no_grad():
        for name, (_, _, tensor) in sorted(_held_tensors(model).items()):
            seed = zlib.crc32(name.encode())
            g = torch.Generator().manual_seed(seed + 7919 * int(tensor.numel()))
            mask = torch.rand(tensor.shape, generator=g) < FRACTIONS[seed % len(FRACTIONS)]
            tensor.add_(tensor.abs().mul(0.05).add(1e-3) * mask)


def plan_cache_checks(model, served) -> dict:
    """``DeltaSync._pieces`` keeps its plan while the parameters stay put and rebuilds it (on
    every rank) when one of them moves to new storage, as after a reload that replaces tensors."""
    import tempfile

    from sapo_megatron.rollout.sglang import SGLangConfig
    from sapo_megatron.rollout.sglang.weight_sync.delta import DeltaSync

    sync = DeltaSync(None, served, SGLangConfig(delta=True), tempfile.mkdtemp())
    first = sync._pieces(model)
    kept = sync._pieces(model) is first
    if dist.get_rank() == 0:  # one rank's tensor moves: every rank must rebuild (or the collective hangs)
        _, _, tensor = sorted(_held_tensors(model).items())[0][1]
        tensor.data = tensor.data.clone()
    again = sync._pieces(model)
    held = {t.untyped_storage().data_ptr() for _, _, t in _held_tensors(model).values()}
    return {"kept": kept, "rebuilt": again is not first,
            "views": all(p.source.untyped_storage().data_ptr() in held for p in again)}


def main() -> None:
    ap = add_layout_args(argparse.ArgumentParser())
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parallel = init_layout(args, seed=1234)
    out, rank = Path(args.out), dist.get_rank()
    hf_config = json.loads((Path(args.hf) / "config.json").read_text())
    served = dict(hf_config, torch_dtype="bfloat16")
    model = build_model_for_hf_config(hf_config, parallel)
    load_hf_into_model(model, args.hf)
    export_hf(model, out / "base", served, dtype="checkpoint")
    differ, reference = PieceDiffer(), PieceDiffer(kernels=None)  # compiled kernels / numpy only
    differ.refresh(local_pieces(export_plan(model, served, "checkpoint"), rank))
    reference.refresh(local_pieces(export_plan(model, served, "checkpoint"), rank))
    perturb(model)
    pieces = local_pieces(export_plan(model, served, "checkpoint"), rank)
    expected = {}
    for piece in pieces:
        expected.update(reference.diff(piece))
    mine = write_delta(str(out / f"delta_r{rank}.safetensors"), differ, pieces, check=True)
    # The compiled path's file and copies equal numpy's, part by part, bit for bit.
    written, _ = dl.read_delta_file(mine[0])
    native_equal = (sorted(written) == sorted(expected) and all(
        written[k].dtype == expected[k].dtype and torch.equal(written[k].view(-1).view(torch.uint8),
                                                             expected[k].contiguous().view(-1).view(torch.uint8))
        for k in expected) and differ.held.keys() == reference.held.keys() and all(
        torch.equal(differ.held[k].view(torch.uint8), reference.held[k].view(torch.uint8)) for k in differ.held))
    plan_cache = plan_cache_checks(model, served)
    export_hf(model, out / "new", served, dtype="checkpoint")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    checks: list = [None] * dist.get_world_size()
    dist.all_gather_object(checks, (differ.kernels is not None, native_equal, plan_cache))
    native_ok, native_all = all(c[0] for c in checks), all(c[1] for c in checks)
    plan_all = [c[2] for c in checks]
    if rank == 0:
        server = dl.load_dir(str(out / "base"))
        new = dl.load_dir(str(out / "new"))
        differs_before = sorted(n for n in new if not torch.equal(server[n].view(torch.int16), new[n].view(torch.int16)))
        kinds, dims, pieces_all, changed = set(), set(), {}, set()
        for path, _, _, _ in everyone:
            parts, meta = dl.read_delta_file(path)
            kinds.update(k.rsplit("@", 1)[1] for k in parts)
            dims.update(None if r is None else r[0] for r in meta.get("regions", {}).values())
            pieces_all.update(meta["pieces"])
            changed.update(dl.apply_parts(server, parts, meta.get("regions", {})))
        equal = sorted(server) == sorted(new) and all(
            torch.equal(server[n].view(torch.uint8), new[n].view(torch.uint8)) for n in new)
        trainer = {k: v for _, _, _, d in everyone for k, v in d.items()}
        served_digests = dl.region_digests(server, pieces_all)
        covered = sum(server[name].numel() if region is None else dl.region_view(server[name], region).numel()
                      for name, region in pieces_all.values())
        result = {"native": native_ok, "native_equal": native_all, "plan_cache": plan_all, "equal": equal, "differs_before": len(differs_before), "tensors": len(new),
                  "changed": len(changed), "kinds": sorted(kinds), "region_dims": sorted(dims, key=str),
                  "digests_equal": served_digests == trainer, "digests": len(trainer),
                  "covered": covered, "elements": sum(t.numel() for t in new.values()),
                  "delta_bytes": sum(n for _, n, _, _ in everyone), "full_bytes": sum(n for _, _, n, _ in everyone)}
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    destroy()


if __name__ == "__main__":
    main()
