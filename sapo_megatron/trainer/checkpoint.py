"""Training checkpoints: save and resume everything a step depends on, published atomically.

Layout::

    OUT/checkpoints/step_000020/rank_00000.pt   # this rank's model shards, optimizer, RNG
    OUT/checkpoints/step_000020/meta.json       # step, data position, scheduler, world layout
    OUT/checkpoints/latest                      # "step_000020", written last

Why this order: every rank writes into ``step_N.tmp``; after a barrier, rank 0 renames the
directory to ``step_N`` (an atomic rename on one filesystem) and only then replaces ``latest``
(written to a temporary file and ``os.replace``-d). A run killed at any point leaves ``latest``
naming a complete checkpoint: the previous one until the new one is fully published. Older
checkpoints beyond ``keep_last`` are deleted after ``latest`` moved.

Resuming restores model shards, optimizer state (Adam moments, step counts), the learning-rate
schedule, torch / Python RNG states and the prompt stream position, so on CPU the next step's
loss is bit-identical to the uninterrupted run. The per-rank files assume the same parallel
layout; ``meta.json`` records it and a different layout is refused with a clear error (convert
the model through ``tools/convert_checkpoint.py`` to change layouts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"
FORMAT = "sapo_megatron.train_checkpoint.v1"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer, *, extra: dict, keep_last: int = 2,
                    extra_state: dict | None = None) -> Path:
    """Write and publish checkpoint ``step`` (a collective: every rank calls it).

    ``extra`` (JSON) goes to ``meta.json``; ``extra_state`` (tensors allowed) is this rank's
    further state, e.g. a lagged rollout engine's weight snapshots, returned by
    :func:`load_checkpoint` as ``meta["extra_state"]``.
    """
    root = Path(root) / "checkpoints"
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    payload = {
        "model": [chunk.state_dict() for chunk in model_chunks],
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(),
        "extra_state": extra_state or {},
    }
    torch.save(payload, tmp / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        meta = {"format": FORMAT, "step": step, "layout": _layout(), **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / LATEST)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The published checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(root) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path, model_chunks, optimizer) -> dict:
    """Restore this rank's state from ``path``; returns the checkpoint's metadata."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sapo_megatron training checkpoint (format {meta.get('format')!r})")
    layout = _layout()
    if meta["layout"] != layout:
        raise ValueError(
            f"checkpoint {path} was written with layout {meta['layout']}, this run has {layout}; "
            f"resume with the same parallel sizes (or convert the model weights)"
        )
    payload = torch.load(path / f"rank_{_rank():05d}.pt", weights_only=False)
    if len(payload["model"]) != len(model_chunks):
        raise ValueError(f"checkpoint has {len(payload['model'])} model chunks, this run {len(model_chunks)}")
    for chunk, state in zip(model_chunks, payload["model"]):
        chunk.load_state_dict(state)
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"])
    meta["extra_state"] = payload.get("extra_state", {})
    return meta
